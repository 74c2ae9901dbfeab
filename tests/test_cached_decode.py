"""Cached decoding (prefill + decode_step over the KV cache) equals the uncached full forward at
every step, for ragged batches, and padding/batching never changes a row's result.

Tiny random configs cover every architecture (Mistral with a window small enough to mask); the
SmolLM2 version (slow) runs on three golden prompts of different lengths.
"""

from __future__ import annotations

import numpy as np
import numpy_reference
import pytest
from flax import nnx

from pikv_jax.config import tiny_config
from pikv_jax.models.weights import build_model

N_STEPS = 6
PROMPT_LENS = (3, 8, 11)
WINDOW = 4  # Mistral: smaller than the prompts and the generated continuation, so it masks


ARCHS = {
    "llama": tiny_config("llama"),
    "qwen2": tiny_config("qwen2"),
    "qwen3": tiny_config("qwen3"),
    "mistral": tiny_config("mistral", sliding_window=WINDOW),
}
ALONE_ROW = {"llama": 0, "qwen2": 1, "qwen3": 2, "mistral": 2}  # one unpadded row per arch (compile budget)


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, stepwise):
    """A tiny model with random non-trivial weights (biases, norms) and its batch run, computed once."""
    run_stepwise, _ = stepwise
    cfg = ARCHS[request.param]
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=3)
    graphdef, params = nnx.split(build_model(cfg, weights))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
    run = run_stepwise(graphdef, params, prompts, N_STEPS, pad_to=12)
    return request.param, cfg, weights, graphdef, params, prompts, run


def test_cached_decode_matches_full_forward_every_step(tiny, stepwise):
    _, run_full = stepwise
    arch, cfg, weights, graphdef, params, prompts, (logits, gen, wrote, length) = tiny
    assert wrote.all()
    np.testing.assert_array_equal(length, np.array(PROMPT_LENS) + N_STEPS)
    full = run_full(graphdef, params, prompts, gen, pad_to=20)
    assert logits.shape == full.shape == (3, N_STEPS + 1, cfg.vocab_size)
    err = np.abs(logits - full).max(axis=(0, 2))
    assert err.max() < 1e-4, f"{arch}: cached vs uncached logits differ per step by {err}"
    # the continuation was chosen from the cached logits; the uncached ones agree on it
    np.testing.assert_array_equal(gen, full[:, :-1].argmax(-1))
    # a varied continuation, so the comparison covers many different cache states
    assert len(set(gen.ravel().tolist())) > 6


def test_cached_decode_matches_numpy_reference(tiny):
    """The same steps against the independent float64 NumPy model (no cache, no padding)."""
    arch, cfg, weights, graphdef, params, prompts, (logits, gen, _, _) = tiny
    hf_cfg = cfg.to_hf_dict()
    for b, p in enumerate(prompts):
        ref = numpy_reference.forward(hf_cfg, weights, list(p) + gen[b].tolist())[len(p) - 1:]
        np.testing.assert_allclose(logits[b], ref, atol=1e-4, rtol=0, err_msg=f"{arch} row {b}")
        if arch == "mistral":  # the window really masks for these lengths
            no_window = numpy_reference.forward(dict(hf_cfg, sliding_window=None), weights,
                                                list(p) + gen[b].tolist())[len(p) - 1:]
            if len(p) + N_STEPS > WINDOW + 1:
                assert np.abs(no_window - ref).max() > 1e-2


def test_padding_and_batch_neighbours_never_change_a_row(tiny, stepwise):
    run_stepwise, _ = stepwise
    arch, cfg, weights, graphdef, params, prompts, (logits, gen, _, _) = tiny
    # 1. a row alone, unpadded, with a cache just large enough: same tokens, same logits
    b = ALONE_ROW[arch]
    alone_logits, alone_gen, _, _ = run_stepwise(graphdef, params, [prompts[b]], N_STEPS)
    np.testing.assert_array_equal(alone_gen[0], gen[b], err_msg=f"{arch} row {b}")
    # other shapes, other float32 reduction orders: ~1e-5 apart (seen in CI); a wrong row is O(1) apart
    np.testing.assert_allclose(alone_logits[0], logits[b], atol=1e-4, rtol=0, err_msg=f"{arch} row {b}")
    # 2. same shapes, rows in another order, random token ids as padding content: bitwise equal
    rng = np.random.default_rng(11)
    order = [2, 0, 1]
    logits2, gen2, _, _ = run_stepwise(graphdef, params, [prompts[i] for i in order], N_STEPS, pad_to=12,
                                       pad_fill=lambda shape: rng.integers(0, cfg.vocab_size, shape))
    for new_b, old_b in enumerate(order):
        np.testing.assert_array_equal(gen2[new_b], gen[old_b])
        np.testing.assert_array_equal(logits2[new_b], logits[old_b])


@pytest.mark.slow
def test_smollm2_cached_decode_matches_full_forward(smollm2_stepwise):
    s = smollm2_stepwise
    assert s["wrote"].all()
    np.testing.assert_array_equal(s["length"], [len(p) + 6 for p in s["prompts"]])
    err = np.abs(s["logits"] - s["full"]).max(axis=(0, 2))
    assert err.max() < 1e-4, f"SmolLM2 cached vs uncached logits differ per step by {err}"
    np.testing.assert_array_equal(s["generated"], s["full"][:, :-1].argmax(-1))


@pytest.mark.slow
def test_smollm2_padding_content_and_row_order_do_not_matter(smollm2, smollm2_stepwise, stepwise, reference):
    """Same compiled shapes, rows permuted and padded with random ids: every row is bitwise the same.
    (Each row alone, unpadded, is what transformers computed: see test_model_reference.)"""
    run_stepwise, _ = stepwise
    s = smollm2_stepwise
    rng = np.random.default_rng(0)
    order = [1, 2, 0]
    logits, gen, _, _ = run_stepwise(smollm2.graphdef, smollm2.params, [s["prompts"][i] for i in order], 6,
                                     pad_to=40, pad_fill=lambda shape: rng.integers(0, 49152, shape))
    for new_b, old_b in enumerate(order):
        np.testing.assert_array_equal(gen[new_b], s["generated"][old_b])
        np.testing.assert_array_equal(logits[new_b], s["logits"][old_b])
    # the greedy continuation of the padded batch is a prefix of transformers' unpadded one
    for b, name in enumerate(s["names"]):
        want = reference["prompts"][name]["greedy24_ids"][:6]
        assert s["generated"][b][: len(want)].tolist() == want, name
