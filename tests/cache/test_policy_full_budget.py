"""With a budget of the whole sequence (prompt + every generated token), every policy must
reproduce the full cache: `teacher_forced` log-probabilities within 1e-5 of the Full policy's,
and `generate` the same tokens, on a tiny random model (one layer: two compilations per policy).

The longest prompt fills its padded length (64), so a policy whose decode-time cache stopped at
the prompt's size would evict during generation and fail here. Iterates the registry (plus
SnapKV + H2O composition); "the whole sequence" is given to each policy in its own terms: a token
budget for policies that take one, a token_budget for Quest's page selection, a window covering
everything for DuoAttention's streaming heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import policy_helpers as ph
import pytest

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies import CachePolicy, policy_class
from pikv_jax.models.weights import build_model

PROMPT_LENS = (64, 41, 57)  # padded to 64 by pad_prompts; the first row has no padding
NEW = 8
TOTAL = 64 + NEW
LAYERS = 1


@pytest.fixture(scope="module")
def lm():
    cfg, weights, _, _ = ph.tiny_model(LAYERS)
    model = PiKVModel(build_model(cfg, weights), None, cfg)
    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
    full = model.generate(prompts, max_new_tokens=NEW, policy=CachePolicy(), stop_ids=())
    conts = full.token_ids  # prompt + continuation = the whole sequence (64 + NEW for the first row)
    lp_full, _ = model.teacher_forced(prompts, conts, policy=CachePolicy(), full_logprobs=True)
    return model, prompts, full, conts, lp_full


def whole_sequence_policy(name: str) -> CachePolicy:
    if name == ph.COMPOSITE:
        return ph.build_policy(name, budget_tokens=TOTAL, num_layers=LAYERS)
    cls = policy_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = {}
    if "token_budget" in fields:  # Quest: every layer selects pages, and enough of them for everything
        extra.update(token_budget=TOTAL, dense_layers=0)
    if "pattern" in fields:  # streaming heads whose window covers the whole sequence
        extra["window"] = TOTAL
    budget = dict(budget_tokens=TOTAL) if ph.capabilities(name)["budget"] else {}
    return ph.build_policy(name, **budget, num_layers=LAYERS, **extra)


@pytest.mark.parametrize("name", ph.policy_names())
def test_whole_sequence_budget_reproduces_the_full_cache(lm, name):
    model, prompts, full, conts, lp_full = lm
    policy = whole_sequence_policy(name)
    caps = [policy.capacity_for(i, 64, NEW) for i in range(LAYERS)]
    assert all(c >= TOTAL for c in caps) or not ph.parts(policy)[1].decode_evict, (
        f"{policy}: capacities {caps} cannot hold the {TOTAL} tokens its budget allows")
    out = model.generate(prompts, max_new_tokens=NEW, policy=policy, stop_ids=())
    assert out.token_ids == full.token_ids
    assert out.finish_reasons == full.finish_reasons
    lp, lengths = model.teacher_forced(prompts, conts, policy=policy, full_logprobs=True)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(lp[b, :n], lp_full[b, :n], rtol=1e-5, atol=1e-5, err_msg=f"row {b}")
