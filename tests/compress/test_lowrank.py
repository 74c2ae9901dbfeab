"""Low-rank compression: SVD bases (exact at full rank, energy-threshold rank choice against numpy),
attention in the code space against attention over the reconstruction, LoRA reproducing SVD at
initialisation, the low-rank cache in generation, and the errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compress_helpers import random_prompts, run_trace, tiny_model, true_kv
from flax import nnx

from pikv_jax.attention import reference
from pikv_jax.cache.policies import H2O, CachePolicy, StreamingLLM
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.lowrank import LowRankLayerCache, LowRankPolicy, decode, encode, lowrank_attention
from pikv_jax.compress.svd import SVDCompressor

LENGTHS, STEPS = (30, 45), 40


def _kv(seed, shape=(2, 2, 40, 16)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_svd_at_full_rank_is_exact():
    k, v = _kv(0)
    c = SVDCompressor(rank=16)
    out = c(k, v)
    assert out.ck.shape == (2, 2, 40, 16)
    rk, rv = out.decompress()
    np.testing.assert_allclose(rk, k, atol=2e-5)
    np.testing.assert_allclose(rv, v, atol=2e-5)
    assert c.get_compression_stats()["relative_error"] < 1e-5


def test_svd_stores_rank_r_codes_and_counts_their_bytes():
    k, v = _kv(1, (1, 2, 64, 16))
    c = SVDCompressor(rank=4, code_dtype=jnp.bfloat16)
    out = c(k, v)
    assert out.ck.shape == (1, 2, 64, 4) and out.ck.dtype == jnp.bfloat16
    stored = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(out))
    s = c.get_compression_stats()
    assert s["stored_bytes"] == out.nbytes() == stored == 2 * 2 * (64 * 4 * 2) + 2 * (2 * 4 * 16 * 4)
    assert s["compression_ratio_vs_bf16"] == pytest.approx(2 * 2 * k.size / stored)
    assert s["compression_ratio"] == pytest.approx(2 * 4 * k.size / stored)  # float32 input


def _expected_energy_rank(x, energy):
    """numpy: smallest r with sum(s[:r]^2) >= energy * sum(s^2), max over heads."""
    out = 0
    for h in range(x.shape[1]):
        s = np.linalg.svd(x[:, h].reshape(-1, x.shape[-1]), compute_uv=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        out = max(out, int(np.argmax(share >= energy - 1e-12)) + 1)
    return out


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_threshold_picks_the_numpy_rank(energy):
    rng = np.random.default_rng(2)
    # a decaying spectrum, different per head
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    scales = [np.geomspace(10, 0.01, 16), np.geomspace(10, 1, 16)]
    k = np.stack([rng.normal(size=(1, 80, 16)) * sc @ basis.T for sc in scales], axis=1).astype(np.float32)
    v = np.stack([rng.normal(size=(1, 80, 16)) * sc[::-1].copy() for sc in scales], axis=1).astype(np.float32)
    c = SVDCompressor(energy_threshold=energy).calibrate(k, v)
    rk, rv = c.bases.ranks(0)
    assert rk == _expected_energy_rank(k, energy)
    assert rv == _expected_energy_rank(v, energy)
    # per-layer ranks: max over heads of each layer; global: max over layers too
    k2 = k[:, :1].repeat(2, axis=1)  # a second layer whose heads both have head 0's spectrum
    layers = SVDCompressor(energy_threshold=energy, per_layer_rank=True).calibrate([k, k2], [v, v])
    assert layers.bases.ranks(0)[0] == rk
    assert layers.bases.ranks(1)[0] == _expected_energy_rank(k2, energy)


def test_attention_in_code_space_equals_attention_over_the_reconstruction():
    rng = np.random.default_rng(3)
    b, hk, g, c, d, rk, rv = 2, 2, 3, 12, 16, 5, 7
    q = jnp.asarray(rng.normal(size=(b, hk * g, d)), jnp.float32)
    ck = jnp.asarray(rng.normal(size=(b, hk, c, rk)), jnp.float32)
    cv = jnp.asarray(rng.normal(size=(b, hk, c, rv)), jnp.float32)
    dec_k = jnp.asarray(rng.normal(size=(hk, rk, d)), jnp.float32)
    dec_v = jnp.asarray(rng.normal(size=(hk, rv, d)), jnp.float32)
    pos = np.tile(np.arange(c, dtype=np.int32), (b, hk, 1))
    pos[0, 1, 4] = -1  # an empty slot
    pos[1] = rng.permutation(c)  # slots out of order
    pos = jnp.asarray(pos)
    q_pos = jnp.array([9, 11], jnp.int32)  # row 0 cannot see positions 10, 11
    out, mass = lowrank_attention(q, ck, cv, pos, q_pos, dec_k, dec_v)
    ref_out, ref_mass = reference.decode_attention(q, decode(ck, dec_k), decode(cv, dec_v), pos, q_pos)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mass, ref_mass, rtol=1e-5, atol=1e-6)
    assert float(mass[0, 1, 4]) == 0.0


def test_lora_at_initialisation_reproduces_svd():
    k, v = _kv(4)
    svd = SVDCompressor(rank=6).calibrate(k, v)
    lora = LoRACompressor(32, rank=6, alpha=12.0, dropout=0.2, num_kv_heads=2).calibrate(k, v)
    a, b = lora(k, v), svd(k, v, layer=0)
    np.testing.assert_allclose(a.decompress()[0], b.decompress()[0], atol=1e-6)
    np.testing.assert_allclose(a.decompress()[1], b.decompress()[1], atol=1e-6)
    q = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 16)), jnp.float32)
    np.testing.assert_allclose(a.attend(q), b.attend(q), atol=1e-5)
    np.testing.assert_allclose(lora.reconstruct(jnp.asarray(k), jnp.asarray(v))[0], b.decompress()[0], atol=1e-5)
    # same bases -> the same generation policy
    assert lora.as_policy().bases.ranks(0) == svd.as_policy().bases.ranks(0) == (6, 6)
    for x, y in zip(lora.bases().layer(0), svd.bases.layer(0)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # dropout acts on the codes in training mode only
    k1 = lora.reconstruct(jnp.asarray(k), jnp.asarray(v))[0]
    lora.train()
    k2 = lora.reconstruct(jnp.asarray(k), jnp.asarray(v))[0]
    lora.eval()
    assert not np.allclose(k1, k2)
    np.testing.assert_array_equal(lora.reconstruct(jnp.asarray(k), jnp.asarray(v))[0], k1)


def test_lora_seed_layout_and_gradients():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 10, 24)), jnp.float32)  # [B, S, hidden]
    lora = LoRACompressor(24, rank=4, alpha=8.0, dropout=0.0)
    out = lora(x, x)
    assert out.ck.shape == (2, 1, 10, 4)

    def loss(m):
        rk, _ = m.reconstruct(x[:, None], x[:, None])
        return jnp.mean((rk - x[:, None]) ** 2)

    grads = nnx.grad(loss)(lora)
    assert float(jnp.abs(grads["k_up"].value).sum()) > 0


def test_errors():
    k, v = _kv(0)
    with pytest.raises(ValueError, match="larger than the head dimension 16"):
        SVDCompressor(rank=17)(k, v)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        SVDCompressor(rank=0)
    with pytest.raises(ValueError, match=r"energy_threshold must be in \(0, 1\]"):
        SVDCompressor(energy_threshold=0.0)
    with pytest.raises(ValueError, match=r"energy_threshold must be in \(0, 1\]"):
        SVDCompressor(energy_threshold=1.5)
    with pytest.raises(ValueError, match="either rank or energy_threshold"):
        SVDCompressor(rank=4, energy_threshold=0.9)
    with pytest.raises(ValueError, match="larger than the head dimension 16"):
        LoRACompressor(32, rank=17, num_kv_heads=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRACompressor(32, rank=0, num_kv_heads=2)
    with pytest.raises(ValueError, match="calibrate"):
        SVDCompressor(rank=4).as_policy()
    with pytest.raises(ValueError, match="re-indexes positions"):
        LowRankPolicy(inner=StreamingLLM(budget_tokens=20, reindex_positions=True),
                      bases=SVDCompressor(rank=4).calibrate(k, v).bases)


# ---------------------------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=None)
def setup():
    model = tiny_model()
    prompts = random_prompts(LENGTHS, seed=5)
    fed = np.random.default_rng(6).integers(3, 97, (len(prompts), STEPS))
    svd_full = SVDCompressor(rank=16).calibrate(model, prompts=prompts)
    svd_low = SVDCompressor(rank=6).calibrate(model, prompts=prompts)
    return model, prompts, fed, svd_full, svd_low


def test_full_rank_svd_cache_in_generation_matches_the_full_cache():
    model, prompts, fed, svd_full, _ = setup()
    full = run_trace(model, CachePolicy(), prompts, fed)
    low = run_trace(model, svd_full.as_policy(), prompts, fed)
    np.testing.assert_allclose(low["logits"], full["logits"], rtol=1e-4, atol=1e-4)
    assert isinstance(low["cache"].layers[0], LowRankLayerCache)


def test_low_rank_cache_stores_codes_under_an_evicting_policy():
    model, prompts, fed, _, svd = setup()
    policy = svd.as_policy(H2O(budget_tokens=24))
    assert policy.label == "h2o+svd:6"
    out = run_trace(model, policy, prompts, fed)
    kv = true_kv(model, prompts, fed)
    for i, layer in enumerate(out["cache"].layers):
        assert layer.capacity == 24 and layer.ck.shape[-1] == 6 and layer.cv.shape[-1] == 6
        assert bool(jnp.all(layer.resident_per_head() == 24))
        assert layer.nbytes() == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(layer))
        # codes are the projections of the keys that were written (layer 0: the uncached keys)
        if i == 0:
            pos = np.asarray(layer.pos)
            want = np.asarray(encode(jnp.asarray(kv[0][0]), layer.enc_k))
            for b in range(2):
                for h in range(2):
                    np.testing.assert_allclose(layer.ck[b, h], want[b, h, pos[b, h]], atol=1e-4)
    # sinks and the recent window stay resident at every step
    for hist in out["pos_hist"]:
        hist = np.asarray(hist)
        for t in range(STEPS):
            for b, n in enumerate(LENGTHS):
                res = set(hist[t, b, 0].tolist())
                assert {0, 1, 2, 3} <= res and n + t in res
