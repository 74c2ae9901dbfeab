"""Method specs -> policies: budgets, composition, options, the registry and the errors."""

import pytest

from pikv_jax.cache.policies import H2O, Composite, PyramidKV, SnapKV, StreamingLLM
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.eval import methods as M


def test_full_has_no_budget():
    m = M.parse_method("full")
    assert m.is_full and m.label == "full" and m.budget is None
    assert type(m.policy) is CachePolicy and not m.policy.has_budget


@pytest.mark.parametrize("spec,ratio", [("h2o@0.25", 0.25), ("H2O@25%", 0.25), ("h2o @ 0.5", 0.5), ("h2o@1", 1.0)])
def test_ratio_budgets(spec, ratio):
    m = M.parse_method(spec)
    assert isinstance(m.policy, H2O)
    assert m.policy.budget_ratio == pytest.approx(ratio) and m.policy.budget_tokens is None
    assert m.label == f"h2o@{ratio:g}"


def test_token_budget_and_alias():
    m = M.parse_method("streaming@256t")
    assert isinstance(m.policy, StreamingLLM) and m.policy.budget_tokens == 256
    assert m.label == "streaming_llm@256t"


def test_composite_shares_the_budget():
    for spec in ("snapkv+h2o@0.25", "snapkv@0.25+h2o"):
        m = M.parse_method(spec)
        assert isinstance(m.policy, Composite)
        assert isinstance(m.policy.prefill_policy, SnapKV) and isinstance(m.policy.decode_policy, H2O)
        assert m.policy.prefill_policy.budget_ratio == 0.25 and m.policy.decode_policy.budget_ratio == 0.25
        assert m.label == "snapkv+h2o@0.25"


def test_options_and_num_layers():
    m = M.parse_method("h2o(recent_ratio=0.3, normalize=True)@0.5")
    assert m.policy.recent_ratio == 0.3 and m.policy.normalize is True
    assert m.label == "h2o(normalize=True,recent_ratio=0.3)@0.5"
    p = M.parse_method("pyramidkv@0.25", num_layers=30).policy
    assert isinstance(p, PyramidKV) and p.num_layers == 30


def test_parse_methods_list_and_dedup():
    ms = M.parse_methods("full, h2o@0.5,h2o@50%, h2o(recent_ratio=0.3,normalize=False)@0.25")
    assert [m.label for m in ms] == ["full", "h2o@0.5", "h2o(normalize=False,recent_ratio=0.3)@0.25"]
    assert M.method_grid(["h2o", "snapkv"], ["0.5", "0.25"]) == ["full", "h2o@0.5", "h2o@0.25", "snapkv@0.5",
                                                                 "snapkv@0.25"]


@pytest.mark.parametrize("spec,match", [
    ("nosuch@0.5", "unknown method 'nosuch'"),
    ("h2o@0", r"outside \(0, 1\]"),
    ("h2o@1.5", r"outside \(0, 1\]"),
    ("h2o@-0.2", r"outside \(0, 1\]"),
    ("h2o@150%", r"outside \(0, 1\]"),
    ("h2o@abc", "not a ratio"),
    ("h2o@0t", "not a ratio"),
    ("h2o", "needs a budget"),
    ("full@0.5", "takes no budget"),
    ("snapkv@0.5+h2o@0.25", "different budgets"),
    ("snapkv+h2o+tova@0.5", "at most two"),
    ("h2o(recent_ratio)@0.5", "key=value"),
    ("h2o(bogus=1)@0.5", "does not take"),
    ("", "empty"),
    ("h2o@@0.5", "cannot parse"),
])
def test_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        M.parse_method(spec)


def test_registry_transform_composes_after_policy():
    """A later compression (e.g. int4) registers a transform; "h2o@0.25+fake4" needs no parser change."""
    seen = {}

    def build(policy, budget, options, ctx):
        seen.update(policy=policy, budget=budget, options=options, ctx=ctx)
        return policy

    M.register_method("fake4", build, role="transform")
    try:
        m = M.parse_method("h2o@0.25+fake4(group=32)", num_layers=5, context_len=100)
        assert seen["ctx"].num_layers == 5 and seen["ctx"].context_len == 100
        assert isinstance(seen["policy"], H2O) and seen["budget"].ratio == 0.25 and seen["options"] == {"group": 32}
        assert m.label == "h2o+fake4(group=32)@0.25" and m.components == ("h2o", "fake4")
        assert "fake4" in M.available_methods()
        only = M.parse_method("fake4")  # a transform alone wraps the full cache
        assert type(seen["policy"]) is CachePolicy and not only.is_full
    finally:
        M._REGISTRY.pop("fake4")
    with pytest.raises(ValueError, match="role"):
        M.register_method("x", build, role="other")


def test_new_policies_are_picked_up(monkeypatch):
    """Policies registered in POLICIES after import are parseable without touching methods.py."""
    from pikv_jax.cache import policies

    monkeypatch.setitem(policies.POLICIES, "mysnap", SnapKV)
    assert isinstance(M.parse_method("mysnap@0.5").policy, SnapKV)


def test_quest_budget_in_tokens():
    assert M.parse_method("quest@256t").policy.token_budget == 256
    m = M.parse_method("quest@0.25", context_len=2048)
    assert m.policy.token_budget == 512 and m.label == "quest@0.25"
    with pytest.raises(ValueError, match="context length"):
        M.parse_method("quest@0.25")


def test_duo_attention_budget_to_retrieval_fraction(tmp_path):
    assert M.duo_retrieval_fraction(0.5, 2048, 64, 256) == pytest.approx((0.5 - 320 / 2048) / (1 - 320 / 2048))
    assert M.duo_retrieval_fraction(0.1, 2048, 64, 256) == 0.0
    assert M.duo_retrieval_fraction(1.0, 2048, 64, 256) == 1.0
    assert M.duo_retrieval_fraction(0.5, 200, 64, 256) == 1.0
    with pytest.raises(ValueError, match="budget"):
        M.parse_method("duo_attention")
    with pytest.raises(ValueError, match="pattern_file"):
        M.parse_method("duo_attention@0.25")


def test_compression_transforms_parse_without_explicit_registration():
    """`pikv eval --methods h2o@0.25+int4` works out of the box: the compression transforms are
    registered on first lookup."""
    m = M.parse_method("h2o@0.25+int4", num_layers=2)
    assert m.policy.bits == 4 and "int8" in M.available_methods()


def test_check_methods_validates_syntax_without_building():
    """`pikv eval` checks specs before loading the model: methods that need the model or the prompt
    length (svd, quest@0.25, duo_attention@0.25) pass the check; malformed ones fail with the reason."""
    M.check_methods(["full", "svd(rank=8)", "quest@0.25", "duo_attention@0.25", "h2o@0.25+int4"])
    M.check_methods("snapkv(obs_window=16)@0.5,h2o@256t")
    for bad, why in [("nosuch@0.5", "unknown method"), ("h2o", "needs a budget"), ("h2o@0.5+tova@0.25", "budgets"),
                     ("h2o@1.5", "")]:
        with pytest.raises(ValueError, match=why):
            M.check_methods([bad])


def test_a_wrapped_scorer_takes_its_own_options():
    """adakv(<scorer>(k=v,...)): the options reach the scorer, the label keeps them, and the
    wrapper's own options still follow the scorer."""
    from pikv_jax.eval.methods import parse_method

    m = parse_method("adakv(kvzip(budget_scope=global,chunk_size=64),safe_fraction=0.3)@0.25")
    assert m.label == "adakv(kvzip(budget_scope=global,chunk_size=64),safe_fraction=0.3)@0.25"
    assert (m.policy.scorer.budget_scope, m.policy.scorer.chunk_size, m.policy.safe_fraction) == ("global", 64, 0.3)
    assert parse_method("adakv(snapkv(obs_window=16))@0.5").policy.scorer.obs_window == 16
    assert parse_method("adakv(kvzip)@0.25").policy.scorer.budget_scope == "layer"
    with pytest.raises(ValueError, match="must look like name or name"):
        parse_method("adakv(kvzip(a=(1))@0.25")
    with pytest.raises(ValueError, match="budget_scope must be one of layer, global"):
        parse_method("adakv(kvzip(budget_scope=all))@0.25")
