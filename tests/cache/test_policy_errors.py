"""Clear errors for bad policy arguments: each names the bad argument and the allowed range.

Iterates the registry, so policies added later are checked too (where a policy rejects budgets
altogether, that rejection is the error checked).
"""

from __future__ import annotations

import math

import policy_helpers as ph
import pytest

from pikv_jax.cache.policies import H2O, POLICIES, CachePolicy, Composite, SnapKV, StreamingLLM, make_policy

NAMES = sorted(POLICIES)


def opts(name):
    """Options that make a policy valid on its own in the tiny-model tests."""
    return ph.tiny_options(POLICIES[name])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, math.nan])
def test_budget_ratio_outside_zero_one_raises(name, ratio):
    with pytest.raises(ValueError, match="budget_ratio"):
        make_policy(name, budget_ratio=ratio, **opts(name))


@pytest.mark.parametrize("name", [n for n in NAMES if ph.capabilities(n)["budget"]])
def test_budget_not_larger_than_sinks_plus_window_raises(name):
    base = dict(opts(name), n_sink=2)
    probe = make_policy(name, budget_tokens=10**6, **base)
    fixed = probe.n_sink + probe.window  # the protected part that does not grow with the budget
    with pytest.raises(ValueError, match=r"budget_tokens=\d+ must be larger than n_sink \+ window"):
        make_policy(name, budget_tokens=fixed, **base)
    make_policy(name, budget_tokens=fixed + 1, **base)  # the smallest budget that leaves a choice
    # a ratio that would leave nothing to choose does not raise: a prompt too short to compress is
    # kept whole (a globally set policy must not fail on short prompts)
    ratio = make_policy(name, budget_ratio=0.01, **base)
    assert ratio.layer_budget(0, 100) == 100


def test_snapkv_budget_must_exceed_sinks_and_observation_window():
    with pytest.raises(ValueError, match="must be larger than n_sink \\+ window = 4 \\+ 64"):
        SnapKV(budget_tokens=68)
    SnapKV(budget_tokens=69)
    with pytest.raises(ValueError, match="budget_tokens=5 must be larger"):
        StreamingLLM(budget_tokens=5, n_sink=5)


@pytest.mark.parametrize("bad", ["nope", "h2o2", "", "snap kv"])
def test_unknown_policy_name_raises_and_lists_the_allowed(bad):
    with pytest.raises(ValueError, match="unknown policy") as e:
        make_policy(bad)
    for name in NAMES:
        assert repr(name) in str(e.value)


def test_aliases_and_case_are_accepted():
    assert isinstance(make_policy("StreamingLLM"), StreamingLLM)
    assert isinstance(make_policy("streaming-llm"), StreamingLLM)
    assert type(make_policy("none")) is CachePolicy


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises_and_names_the_allowed(name):
    with pytest.raises(ValueError, match=r"does not take \['bogus_option'\]") as e:
        make_policy(name, bogus_option=1, **opts(name))
    assert "allowed options" in str(e.value) and "n_sink" in str(e.value)


def test_option_of_another_policy_is_unknown():
    with pytest.raises(ValueError, match="obs_window"):
        make_policy("h2o", obs_window=8)
    with pytest.raises(ValueError, match="recent_ratio"):
        make_policy("snapkv", recent_ratio=0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("every", [0, -1, 2.0, "3"])
def test_evict_every_below_one_or_not_an_integer_raises(name, every):
    with pytest.raises(ValueError, match="evict_every"):
        make_policy(name, evict_every=every, **opts(name))


def test_composite_without_a_prefill_budget_raises():
    with pytest.raises(ValueError, match="prefill_policy needs a budget"):
        Composite(prefill_policy=SnapKV(), decode_policy=H2O())
    Composite(prefill_policy=SnapKV(budget_tokens=100), decode_policy=H2O())


def test_composite_rejects_reindexed_positions():
    with pytest.raises(ValueError, match="re-index"):
        Composite(prefill_policy=SnapKV(budget_tokens=100), decode_policy=StreamingLLM(reindex_positions=True))


def test_other_argument_errors():
    with pytest.raises(ValueError, match="either budget_ratio or budget_tokens"):
        H2O(budget_ratio=0.5, budget_tokens=10)
    with pytest.raises(ValueError, match="budget_tokens must be an integer >= 1"):
        H2O(budget_tokens=0)
    with pytest.raises(ValueError, match="n_sink and window must be >= 0"):
        H2O(n_sink=-1)
    with pytest.raises(ValueError, match="group_reduce"):
        H2O(group_reduce="median")
    with pytest.raises(ValueError, match="recent_ratio"):
        H2O(recent_ratio=1.0)
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="obs_window"):
        SnapKV(obs_window=0)
    with pytest.raises(ValueError, match="num_layers"):
        make_policy("pyramidkv", budget_tokens=100)
    with pytest.raises(ValueError, match="decode-time eviction needs a budget"):
        H2O().capacity_for(0, 16, 4)
