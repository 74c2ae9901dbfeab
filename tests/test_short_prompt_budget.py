"""A ratio budget set once for every request leaves prompts too short to compress whole.

A row whose ratio budget would not exceed n_sink + window has nothing left to choose, so it keeps
all its tokens (it used to raise "budget_ratio=... keeps N tokens of an M-token prompt, not more
than n_sink + window").
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies import make_policy
from pikv_jax.config import tiny_config

SENTENCE = [17, 42, 5, 88, 23, 61, 9, 30, 74, 12, 55, 3]  # a one-sentence prompt: 12 token ids
POLICIES = [dict(name="h2o", window=32), dict(name="snapkv"), dict(name="tova", window=16),
            dict(name="streaming_llm", window=40)]


@pytest.fixture(scope="module")
def model():
    return PiKVModel.from_config(tiny_config(), seed=0)


@pytest.mark.parametrize("opts", POLICIES, ids=lambda o: o["name"])
def test_global_ratio_policy_keeps_a_one_sentence_prompt_whole(model, opts):
    opts = dict(opts)
    policy = make_policy(opts.pop("name"), budget_ratio=0.5, **opts)
    assert policy.whole_prompt_len >= len(SENTENCE)  # tova: not the padded width 64 (the row-level path)
    full = model.generate([SENTENCE], max_new_tokens=8, stop_ids=())
    everywhere = PiKVModel(model.model, None, model.config, policy=policy)  # the policy set once, globally
    out = everywhere.generate([SENTENCE], max_new_tokens=8, stop_ids=())
    assert out.stats["policy"] == policy.label
    assert out.token_ids == full.token_ids  # nothing was evicted: the same tokens as the full cache
    assert out.stats["kept_tokens"] >= len(SENTENCE)


def test_short_rows_of_a_ragged_batch_keep_their_tokens_long_rows_are_compressed():
    policy = make_policy("snapkv", budget_ratio=0.5)  # n_sink 4 + window 64: rows up to 136 tokens stay whole
    assert policy.whole_prompt_len == 136
    lengths = jnp.asarray([12, 136, 137, 300])
    np.testing.assert_array_equal(policy.base_row_budget(lengths), [12, 136, 69, 150])
    assert policy.layer_budget(0, 128) == 128  # raised before
    assert policy.layer_budget(0, 320) == 160
    assert make_policy("h2o", budget_ratio=0.5).whole_prompt_len == 8  # 4 sinks, no fixed window
    assert make_policy("h2o", budget_tokens=40).whole_prompt_len == 0  # only ratio budgets


def test_ragged_batch_with_a_short_row_generates(model):
    policy = make_policy("h2o", budget_ratio=0.5, window=32)
    long_prompt = list(np.random.default_rng(0).integers(3, 97, size=150))
    out = model.generate([SENTENCE, long_prompt], max_new_tokens=4, policy=policy, stop_ids=())
    alone = model.generate([SENTENCE], max_new_tokens=4, stop_ids=())
    assert all(len(t) == 4 for t in out.token_ids)
    assert out.token_ids[0] == alone.token_ids[0]  # the short row kept everything


def test_prompt_of_one_padded_width_128_no_longer_raises(model):
    """The reported case: a 65..128-token prompt (a chat template around one sentence) under
    budget_ratio=0.5 with n_sink + window = 68 raised at every call."""
    prompt = list(np.random.default_rng(1).integers(3, 97, size=100))
    policy = make_policy("snapkv", budget_ratio=0.5)
    out = model.generate([prompt], max_new_tokens=4, policy=policy, stop_ids=())
    assert out.token_ids == model.generate([prompt], max_new_tokens=4, stop_ids=()).token_ids
