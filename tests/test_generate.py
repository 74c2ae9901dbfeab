"""The jitted generation loop: per-row stopping (stop token, max_new_tokens, cache full), streaming,
compilation counts, buffer donation, and seeded sampling through `PiKVModel.generate`.

All on a tiny random Llama (`tiny_lm` in conftest) whose greedy continuations are varied; the
reference continuation is the step-by-step cached path checked against the full forward elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.state import init_cache
from pikv_jax.runtime.generate import GenerationLoop, pad_prompts
from pikv_jax.sampling import SamplingConfig

N = 8


@contextlib.contextmanager
def compiled_functions():
    """Collects the names of the functions XLA compiles inside the block (jax.log_compiles)."""
    names: list[str] = []
    pattern = re.compile(r"Finished XLA compilation of (?:jit\()?([\w<>.]+)")

    class Collect(logging.Handler):
        def emit(self, record):
            m = pattern.search(record.getMessage())
            if m:
                names.append(m.group(1))

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def greedy_run(tiny_lm):
    """Greedy, no stop ids, 8 tokens for each of the three prompts."""
    model, prompts = tiny_lm
    return model.generate(prompts, N, stop_ids=())


def test_greedy_loop_equals_step_by_step_argmax(tiny_lm, greedy_run, stepwise):
    model, prompts = tiny_lm
    out = greedy_run
    run_stepwise, _ = stepwise
    logits, gen, _, _ = run_stepwise(model.graphdef, model.params, prompts, N - 1, pad_to=12)
    want = np.concatenate([gen, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert [list(t) for t in want] == out.token_ids
    assert out.finish_reasons == ["max_tokens"] * 3
    assert all(len(t) == N for t in out.token_ids)
    assert len(set(sum(out.token_ids, []))) > 6  # a varied continuation


def test_rows_stop_independently_on_stop_token_max_tokens_and_cache_full(tiny_lm, greedy_run):
    """One batch, three reasons: row 0 hits a stop id, row 1 reaches max_new_tokens, row 2 fills a
    `max_cache_tokens`-slot cache. Every row's tokens are the greedy run's up to its own end, and
    the streaming callback sees exactly the returned tokens, in order."""
    model, prompts = tiny_lm
    ref = greedy_run.token_ids
    cap = 16  # row b has room for cap - len(prompt_b) fed tokens, i.e. cap - len + 1 emitted ones
    room = [cap - len(p) + 1 for p in prompts]
    assert room[1] > N > room[2]
    # a stop id that row 0 emits (first occurrence at index k >= 1) and rows 1 and 2 never emit
    candidates = [(k, t) for k, t in enumerate(ref[0]) if k >= 1 and t not in ref[0][:k]
                  and t not in ref[1] and t not in ref[2][: room[2]]]
    assert candidates, "test setup: no usable stop id in the greedy continuation"
    k, stop = candidates[0]

    stream: list[tuple[int, list[int], list[bool]]] = []

    def callback(step, tokens, emitted):
        stream.append((int(step), np.asarray(tokens).tolist(), np.asarray(emitted).tolist()))

    out = model.generate(prompts, N, stop_ids=[stop], max_cache_tokens=cap, callback=callback)
    assert out.finish_reasons == ["stop_token", "max_tokens", "cache_full"]
    assert out.token_ids[0] == ref[0][: k + 1] and out.token_ids[0][-1] == stop
    assert out.token_ids[1] == ref[1]
    assert out.token_ids[2] == ref[2][: room[2]]
    # streaming: steps in order, each row's emitted tokens are the returned ones
    steps = [s for s, _, _ in stream]
    assert steps == list(range(len(steps)))
    per_row = [[tok[b] for _, tok, em in stream if em[b]] for b in range(3)]
    assert per_row == out.token_ids
    # measured stats of this batch: the allocated cache (L x (K, V f32 + pos i32 + score f32) + lengths),
    # and how full it ended: row 0 holds its prompt and all but its last token, rows 1 and 2 likewise
    cfg = model.config
    assert out.stats["cache_capacity_tokens"] == cap
    assert out.stats["cache_bytes"] == cfg.num_hidden_layers * (
        2 * 3 * cfg.num_key_value_heads * cap * cfg.dim_per_head * 4 + 3 * cfg.num_key_value_heads * cap * 8) + 3 * 4
    resident = [len(p) + len(t) - 1 for p, t in zip(prompts, out.token_ids)]
    assert resident[2] == cap  # the full row
    assert out.stats["cache_fill"] == pytest.approx(sum(resident) / (3 * cap), rel=1e-6)


def test_no_recompilation_per_step_or_per_call(tiny_lm, greedy_run):
    """A repeated call compiles nothing; another max_new_tokens compiles one decode loop, which then
    runs every step (the loop is one `lax.while_loop`, never retraced per step)."""
    model, prompts = tiny_lm
    out = greedy_run
    with compiled_functions() as again:
        out2 = model.generate(prompts, N, stop_ids=())
    assert again == [] and out2.stats["compile_s"] == 0.0
    assert out2.token_ids == out.token_ids
    n = 5  # a length no other test uses on this model, so the loop must compile here
    with compiled_functions() as other:
        out3 = model.generate(prompts, n, stop_ids=())
    # the decode loop compiles once for 4 steps; prefill too because its token buffer holds
    # max_new_tokens (and a Full cache's capacity grows with it)
    assert other.count("decode") == 1 and other.count("prefill") <= 1, other
    assert out3.stats["decode_steps"] == n - 1 and out3.stats["compile_s"] > 0
    assert out3.token_ids == [t[:n] for t in out.token_ids]
    assert out3.finish_reasons == ["max_tokens"] * 3


def test_prefill_and_decode_consume_donated_buffers(tiny_lm):
    model, prompts = tiny_lm
    cfg = model.config
    loop = GenerationLoop(graphdef=model.graphdef, policy=CachePolicy(), sampling=SamplingConfig(),
                          max_new_tokens=4, stop_ids=())
    tokens, lengths = pad_prompts(prompts, multiple=16)
    cache = init_cache(3, 20, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                       head_dim=cfg.dim_per_head)
    key = jax.random.key(0)
    args = (model.params, jnp.asarray(tokens), jnp.asarray(lengths), cache, key)
    prefill = GenerationLoop.prefill.lower(loop, *args).compile()  # as PiKVModel.generate does
    assert "input_output_alias" in prefill.as_text()  # the cache buffers are aliased to outputs
    state = prefill(*args)
    # every per-layer buffer (keys, values, positions, scores) was reused for the output; only the
    # i32[B] `length` may survive, since prefill replaces it with the prompt lengths
    layer_leaves = jax.tree_util.tree_leaves(cache.layers)
    assert len(layer_leaves) >= 4 * cfg.num_hidden_layers and all(x.is_deleted() for x in layer_leaves)
    assert not key.is_deleted() and not jax.tree_util.tree_leaves(model.params)[0].is_deleted()
    final = loop.decode(model.params, state)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.cache.layers))
    assert np.asarray(final.num_generated).tolist() == [4, 4, 4]


def test_seeded_sampling_is_reproducible_and_row_independent(tiny_lm, greedy_run):
    model, (a, b, c) = tiny_lm
    kw = dict(temperature=1.0, top_p=0.9, seed=7, stop_ids=())
    out_ab = model.generate([a, b], N, **kw)
    out_ab2 = model.generate([a, b], N, **kw)
    out_ac = model.generate([a, c], N, **kw)
    assert out_ab.token_ids == out_ab2.token_ids  # reproducible
    assert out_ac.token_ids[0] == out_ab.token_ids[0]  # row 0 does not see row 1's prompt
    other_seed = model.generate([a, b], N, **{**kw, "seed": 8})
    assert other_seed.token_ids != out_ab.token_ids
    assert out_ab.stats["compile_s"] > 0 and out_ab2.stats["compile_s"] == 0.0
    assert out_ab.token_ids[0] != greedy_run.token_ids[0]  # it did sample


def test_compiled_programs_are_a_bounded_lru():
    """A long-lived model keeps only its MAX_COMPILED most recently used programs."""
    from pikv_jax.api import PiKVModel
    from pikv_jax.config import tiny_config

    m = PiKVModel.from_config(tiny_config(), seed=0)
    m.MAX_COMPILED = 2
    for n in (2, 3, 4):  # three cache capacities: three programs
        m.generate([[1, 2, 3]], n, stop_ids=())
    assert len(m._compiled) == 2
    first = next(iter(m._compiled))
    m.generate([[1, 2, 3]], 3, stop_ids=())  # a hit moves its program to the newest end
    assert next(reversed(m._compiled)) == first


@pytest.mark.parametrize("policy", [None, "snapkv@0.5"])
def test_suffixes_of_different_lengths_share_a_batch_row_for_row(tiny_lm, policy):
    """Questions fed after the compressed context may differ in length within one batch (the eval
    batches them by context only): each row equals the same context and question run alone."""
    from pikv_jax.eval.methods import parse_methods

    model, prompts = tiny_lm
    pol = None if policy is None else parse_methods(policy, num_layers=model.config.num_hidden_layers)[0].policy
    contexts = [prompts[0][:10], prompts[1][:10], prompts[2][:10]]
    rng = np.random.default_rng(3)
    suffixes = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (2, 7, 4)]
    batch = model.generate(contexts, 5, stop_ids=(), policy=pol, suffixes=suffixes)
    for i in range(3):
        alone = model.generate([contexts[i]], 5, stop_ids=(), policy=pol, suffixes=[suffixes[i]])
        assert batch.token_ids[i] == alone.token_ids[0], i
