"""Token sampling: greedy, temperature, top-k, top-p, seeding, against exact small cases and
empirical frequencies (fixed seeds, so every assertion is deterministic)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pikv_jax.sampling import SamplingConfig, filter_logits, sample


@functools.partial(jax.jit, static_argnums=(1, 3))
def _draws(logits, cfg, key, n):
    """n draws (steps 0..n-1) for each row of logits f32[B, V] -> i32[n, B]."""
    return jax.vmap(lambda step: sample(logits, cfg, key, step))(jnp.arange(n))


def _logits(seed, shape, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


def test_greedy_is_argmax():
    logits = _logits(0, (5, 300))
    got = sample(logits, SamplingConfig(), jax.random.key(0), 0)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))
    assert got.dtype == jnp.int32


@pytest.mark.parametrize("temperature", [0.05, 1.0, 30.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    logits = _logits(1, (4, 50))
    draws = _draws(logits, SamplingConfig(temperature=temperature, top_k=1), jax.random.key(3), 64)
    np.testing.assert_array_equal(np.asarray(draws), np.broadcast_to(np.argmax(np.asarray(logits), -1), (64, 4)))


def test_top_k_never_samples_outside_the_top_k():
    k = 5
    logits = _logits(2, (3, 40), scale=1.0)
    draws = np.asarray(_draws(logits, SamplingConfig(temperature=3.0, top_k=k), jax.random.key(1), 2000))
    top = np.argsort(-np.asarray(logits), -1)[:, :k]
    for b in range(3):
        assert set(draws[:, b].tolist()) == set(top[b].tolist())  # inside the top k, and all of it is reachable


def test_top_p_keeps_the_smallest_nucleus_exactly():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    expected = {  # smallest set of most likely tokens whose mass reaches top_p
        0.3: {1},
        0.6: {1, 3},
        0.8: {1, 3, 4},  # 0.5 + 0.2 = 0.7 < 0.8 <= 0.85
        0.9: {1, 3, 4, 2},
        0.99: {0, 1, 2, 3, 4},
        1.0: {0, 1, 2, 3, 4},
    }
    for top_p, keep in expected.items():
        out = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=top_p)))[0]
        kept = {i for i in range(5) if out[i] > -1e30}
        assert kept == keep, f"top_p={top_p}: kept {kept}, want {keep}"
        np.testing.assert_array_equal(out[sorted(keep)], np.asarray(logits)[0, sorted(keep)])


def test_top_p_samples_follow_the_renormalised_nucleus():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    n = 20000
    draws = np.asarray(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.8), jax.random.key(5), n))[:, 0]
    counts = np.bincount(draws, minlength=5)
    assert counts[0] == counts[2] == 0
    want = np.array([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85
    _assert_frequencies(counts[[1, 3, 4]], want[[1, 3, 4]], n)


def _assert_frequencies(counts, p, n):
    """Pearson chi-square against the expected probabilities; bound = the 99.9% quantile of the
    chi-square distribution with len(p) - 1 degrees of freedom (deterministic under the fixed seed)."""
    quantile_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
    expected = n * np.asarray(p)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < quantile_999[len(p) - 1], f"chi2={chi2:.1f}, counts={counts}, expected={expected.round(1)}"


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_empirical_frequencies_match_softmax_over_temperature(temperature):
    logits = jnp.asarray([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.8, 1.5]], jnp.float32)
    n = 20000
    draws = np.asarray(_draws(logits, SamplingConfig(temperature=temperature), jax.random.key(11), n))[:, 0]
    z = np.asarray(logits[0], np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    _assert_frequencies(np.bincount(draws, minlength=8), p, n)
    # and it is not the untempered distribution (for T != 1 the test has power)
    if temperature != 1.0:
        z1 = np.exp(np.asarray(logits[0], np.float64))
        with pytest.raises(AssertionError):
            _assert_frequencies(np.bincount(draws, minlength=8), z1 / z1.sum(), n)


def test_seeded_sampling_is_reproducible_and_row_independent():
    cfg = SamplingConfig(temperature=1.0)
    logits = _logits(4, (3, 64), scale=0.5)  # flat enough that the draws vary
    key = jax.random.key(42)
    a = np.asarray(_draws(logits, cfg, key, 200))
    b = np.asarray(_draws(logits, cfg, key, 200))
    np.testing.assert_array_equal(a, b)
    assert len(set(a[:, 0].tolist())) > 20
    # other rows' logits, and the batch size, do not change row 0's draws
    other = logits.at[1:].set(_logits(5, (2, 64)))
    np.testing.assert_array_equal(np.asarray(_draws(other, cfg, key, 200))[:, 0], a[:, 0])
    np.testing.assert_array_equal(np.asarray(_draws(logits[:1], cfg, key, 200))[:, 0], a[:, 0])
    # another seed gives other draws; rows with equal logits still draw differently (own keys)
    c = np.asarray(_draws(logits, cfg, jax.random.key(43), 200))
    assert (c[:, 0] != a[:, 0]).mean() > 0.5
    same = jnp.broadcast_to(logits[:1], (2, 64))
    d = np.asarray(_draws(same, cfg, key, 200))
    assert (d[:, 0] != d[:, 1]).mean() > 0.5


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 1.7]), st.sampled_from([0, 1, 3, 40, 64]),
                          st.sampled_from([1.0, 0.9, 0.5, 0.05])), min_size=1, max_size=5),
       st.integers(0, 2**16), st.integers(0, 50))
def test_sample_rows_draws_what_sample_draws_with_each_rows_settings(rows, seed, step):
    """One program for rows with different settings: each row equals `sample` run on that row
    alone with its settings and key (row_keys of a batch of one), greedy rows included."""
    from pikv_jax.sampling import row_keys, sample_rows

    logits = _logits(seed, (len(rows), 64), scale=2.0)
    keys = jnp.stack([row_keys(jax.random.key(seed + i), step, 1)[0] for i in range(len(rows))])
    got = np.asarray(sample_rows(logits, jnp.asarray([r[0] for r in rows], jnp.float32),
                                 jnp.asarray([r[1] for r in rows], jnp.int32),
                                 jnp.asarray([r[2] for r in rows], jnp.float32), keys))
    for i, (t, k, p) in enumerate(rows):
        want = sample(logits[i: i + 1], SamplingConfig(temperature=t, top_k=k, top_p=p), jax.random.key(seed + i), step)
        assert got[i] == int(want[0]), (i, t, k, p)
