"""The seed guide's compression calls as written: `compressed_keys, compressed_values = compressor(keys,
values, importance)` for every compressor (unpacking = the decompressed tensors in the caller's layout
and dtype), per-layer [B, heads, S, head_dim] keys for compressors built with hidden_size (LoRA
compressing each token's concatenated heads), and compression_ratio against the caller's bytes with
the bf16-relative figure apart, checked against byte counts computed by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pikv_jax.compress import (
    ChunkKVCompressor,
    FastVCompressor,
    LoRACompressor,
    LowRankKV,
    PiKVCompressor,
    PyramidCompressor,
    QuantizedCompressor,
    QuantizedKV,
    SelectedKV,
    SVDCompressor,
)

B, H, S, D = 2, 4, 64, 32
HIDDEN = H * D


def _kv(seed=0, shape=(B, H, S, D), dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)


NAMES = ("pikv", "lora", "pyramid", "fastv", "svd", "quantized", "chunkkv")


def _seed_compressors(hidden=HIDDEN):
    """The guide's seven compressors, built the guide's way (hidden_size first where it has one)."""
    return {
        "pikv": PiKVCompressor(hidden_size=hidden, compression_methods=["lora", "pyramid", "fastv"],
                               importance_threshold=0.5, adaptive_selection=True),
        "lora": LoRACompressor(hidden_size=hidden, rank=32, alpha=1.0, dropout=0.1),
        "pyramid": PyramidCompressor(hidden_size=hidden, compression_ratio=0.5, num_levels=3, decay_factor=0.8,
                                     obs_window=8),
        "fastv": FastVCompressor(hidden_size=hidden),
        "svd": SVDCompressor(rank=16, hidden_size=hidden),
        "quantized": QuantizedCompressor(bits=8, group_size=32, residual_length=32, hidden_size=hidden),
        "chunkkv": ChunkKVCompressor(chunk_size=8, compression_ratio=0.5, obs_window=8, hidden_size=hidden),
    }


def _concat_heads(x):
    """[B, H, S, D] -> [B, S, H * D] (each token's heads side by side)."""
    b, h, s, d = x.shape
    return np.swapaxes(np.asarray(x), 1, 2).reshape(b, s, h * d)


def _split_heads(x, h):
    """[B, S, H * D] -> [B, H, S, D]."""
    b, s, hd = x.shape
    return np.swapaxes(np.asarray(x).reshape(b, s, h, hd // h), 1, 2)


# ---------------------------------------------------------------------------------------------- 1. unpacking


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("importance", [None, "high", "low"])
def test_unpacking_is_the_decompressed_kv_in_the_seed_layout(name, importance):
    """[B, S, hidden] in -> [B, S, hidden] out: the stored layout is [B, Hc, S, hidden / Hc]."""
    k, v = _kv(1, (B, S, HIDDEN))
    imp = None if importance is None else jnp.full((B, S), 0.9 if importance == "high" else 0.1)
    c = _seed_compressors()[name]
    out = c(k, v, imp)
    ck, cv = out  # the guide's unpacking
    assert ck.shape == cv.shape == (B, S, HIDDEN) and ck.dtype == cv.dtype == jnp.float32
    dk, dv = out.decompress()  # stored layout [B, Hc, S, Dc]
    assert dk.shape[0] == B and dk.shape[2] == S and dk.shape[1] * dk.shape[3] == HIDDEN
    np.testing.assert_array_equal(ck, _concat_heads(dk))
    np.testing.assert_array_equal(cv, _concat_heads(dv))
    # the object stays the real smaller pytree
    assert out.nbytes() < k.nbytes + v.nbytes
    assert out.attend(jnp.ones((B, dk.shape[1], dk.shape[3]))).shape == (B, dk.shape[1], dk.shape[3])


@pytest.mark.parametrize("name", NAMES)
def test_unpacking_keeps_per_layer_heads(name):
    """[B, heads, S, head_dim] in -> the same layout out: decompress() regrouped back per head."""
    k, v = _kv(2)
    out = _seed_compressors()[name](k, v)
    ck, cv = out
    assert ck.shape == cv.shape == (B, H, S, D)
    dk, dv = out.decompress()
    if dk.shape[1:] == (H, S, D):  # heads kept as given (selection, quantization)
        np.testing.assert_array_equal(ck, dk)
        np.testing.assert_array_equal(cv, dv)
    else:  # each token's concatenated heads stored as [B, Hc, S, hidden / Hc]
        np.testing.assert_array_equal(ck, _split_heads(_concat_heads(dk), H))
        np.testing.assert_array_equal(cv, _split_heads(_concat_heads(dv), H))


def test_unpacking_returns_the_callers_dtype():
    k, v = _kv(3)
    kb, vb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    for c in _seed_compressors().values():
        out = c(kb, vb)
        ck, cv = out
        assert ck.dtype == cv.dtype == jnp.bfloat16 and ck.shape == (B, H, S, D)
        assert out.decompress()[0].dtype == jnp.float32  # the stored view stays float32


def test_unpacked_selection_zeroes_dropped_tokens_at_their_positions():
    k, v = _kv(4)
    out = FastVCompressor(drop_ratio=0.5)(k, v)
    assert isinstance(out, SelectedKV) and out.k.shape[2] == S // 2  # really half the tokens stored
    ck, cv = out
    kept = np.zeros((B, H, S), bool)
    for b in range(B):
        for h in range(H):
            kept[b, h, np.asarray(out.pos[b, h])[np.asarray(out.pos[b, h]) >= 0]] = True
    assert kept.sum() == B * H * S // 2
    np.testing.assert_array_equal(np.asarray(ck)[kept], k[kept])
    np.testing.assert_array_equal(np.asarray(cv)[kept], v[kept])
    assert not np.asarray(ck)[~kept].any() and not np.asarray(cv)[~kept].any()


def test_unpacked_quantized_is_dequantized_then_residual():
    k, v = _kv(5)
    out = QuantizedCompressor(bits=4, group_size=32, residual_length=32)(k, v)
    assert isinstance(out, QuantizedKV) and out.kq.dtype == jnp.uint8
    ck, cv = out
    np.testing.assert_array_equal(np.asarray(ck)[:, :, 32:], k[:, :, 32:])  # residual exact
    assert 0 < np.abs(np.asarray(ck)[:, :, :32] - k[:, :, :32]).max() < 0.5  # 4-bit codes


def test_compress_called_directly_unpacks_in_the_stored_layout():
    k, v = _kv(6)
    out = SVDCompressor(rank=4).compress(jnp.asarray(k), jnp.asarray(v))
    ck, _ = out
    np.testing.assert_array_equal(ck, out.decompress()[0])


# ---------------------------------------------------------------------------------------------- 2. per-layer keys


@pytest.mark.parametrize("shape", [(B, H, S, D), (B, S, HIDDEN), (B, 1, S, HIDDEN), (B, 2, S, HIDDEN // 2)])
def test_every_hidden_size_compressor_accepts_the_allowed_layouts(shape):
    k, v = _kv(7, shape)
    for name, c in _seed_compressors().items():
        ck, cv = c(k, v)
        assert ck.shape == cv.shape == shape, name


@pytest.mark.parametrize("shape", [(B, 3, S, D), (B, S, HIDDEN + 1), (B, 1, S, D), (S, HIDDEN), (1, B, H, S, D)])
def test_a_layout_mismatch_names_keys_hidden_size_and_the_allowed_layouts(shape):
    k, v = _kv(8, shape)
    for name, c in _seed_compressors().items():
        with pytest.raises(ValueError, match=r"keys of shape .* do not fit hidden_size=128; allowed layouts: "
                                             r"\[B, S, 128\], \[B, 1, S, 128\] or per layer \[B, heads, S, "
                                             r"head_dim\] with heads \* head_dim = 128"):
            c(k, v)


def test_lora_at_full_rank_round_trips_per_layer_keys():
    k, v = _kv(9)
    c = LoRACompressor(hidden_size=HIDDEN, rank=HIDDEN, alpha=1.0, dropout=0.1)
    out = c(k, v)
    assert out.ck.shape == (B, 1, S, HIDDEN)  # one code per token of all heads together
    ck, cv = out
    np.testing.assert_allclose(ck, k, atol=2e-4)
    np.testing.assert_allclose(cv, v, atol=2e-4)


def test_lora_compresses_each_tokens_concatenated_heads():
    k, v = _kv(10)
    c = LoRACompressor(hidden_size=HIDDEN, rank=16, alpha=1.0)
    out = c(k, v)
    assert out.ck.shape == (B, 1, S, 16)
    # numpy: x = concat of the heads [B, S, H*D]; reconstruction = scaling * (x down) up, split back per head
    for x, got, down, up in ((k, out.unpacked()[0], c.k_down.value[0, 0], c.k_up.value[0, 0]),
                             (v, out.unpacked()[1], c.v_down.value[0, 0], c.v_up.value[0, 0])):
        want = _split_heads(c.scaling * (_concat_heads(x) @ np.asarray(down)) @ np.asarray(up), H)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the same compressor on the seed layout of the same tokens gives the same codes
    seed = c(_concat_heads(k), _concat_heads(v))
    np.testing.assert_allclose(seed.ck, out.ck, rtol=1e-5, atol=1e-5)


def test_lora_with_kv_heads_regroups_into_its_heads():
    k, v = _kv(11, (B, S, HIDDEN))  # the seed layout, stored as 2 heads of 64
    c = LoRACompressor(hidden_size=HIDDEN, rank=64, num_kv_heads=2)
    out = c(k, v)
    assert out.ck.shape == (B, 2, S, 64)
    ck, _ = out
    np.testing.assert_allclose(ck, k, atol=2e-4)  # rank 64 = the head width: exact


def test_guide_integration_example_per_layer_keys():
    """PiKVEnhancedModel: PiKVCompressor(hidden_size, ["lora", "pyramid"]) on a layer's [B, H, S, D]."""
    k, v = _kv(12)
    c = PiKVCompressor(hidden_size=HIDDEN, compression_methods=["lora", "pyramid"], importance_threshold=0.5)
    compressed_key, compressed_value = c(k, v)
    assert compressed_key.shape == compressed_value.shape == (B, H, S, D)
    stats = c.get_compression_stats()
    assert stats["method_usage"] == {"lora": 1} and stats["compression_ratio"] > 1


# ---------------------------------------------------------------------------------------------- 3. stats by hand

F32_INPUT = 2 * (B * H * S * D) * 4  # K + V as passed: 131072 bytes
BF16_FULL = 2 * (B * H * S * D) * 2  # an uncompressed bf16 K + V of the same tokens: 65536 bytes


def _ratios(c, k, v, **kw):
    out = c(k, v, **kw)
    s = c.get_compression_stats()
    return out, s


def test_stats_int8_by_hand():
    k, v = _kv(13)
    out, s = _ratios(QuantizedCompressor(bits=8, group_size=32, residual_length=32), k, v)
    # 32 tokens quantized, the newest 32 in float32
    codes = 2 * (B * H * 32 * D)  # u8 keys + values
    key_scales = 2 * (B * H * (32 // 32) * D * 2)  # scale + minimum per channel per token group, f16
    value_scales = 2 * (B * H * 32 * (D // 32) * 2)  # scale + minimum per token per channel group, f16
    residual = 2 * (B * H * 32 * D * 4)  # float32 keys + values
    stored = codes + key_scales + value_scales + residual
    assert stored == 83968 == out.nbytes() == s["stored_bytes"]
    assert s["input_bytes"] == F32_INPUT and s["full_bf16_bytes"] == BF16_FULL
    assert s["compression_ratio"] == pytest.approx(F32_INPUT / stored)  # 1.56
    assert s["compression_ratio_vs_bf16"] == pytest.approx(BF16_FULL / stored)  # 0.78


@pytest.mark.parametrize("make", [lambda: FastVCompressor(drop_ratio=0.5),
                                  lambda: ChunkKVCompressor(chunk_size=8, compression_ratio=0.5, obs_window=8)])
def test_stats_selection_by_hand(make):
    k, v = _kv(14)
    out, s = _ratios(make(), k, v)
    stored = 2 * (B * H * (S // 2) * D * 4) + B * H * (S // 2) * 4  # half the tokens (f32) + i32 positions
    assert stored == 66560 == out.nbytes() == s["stored_bytes"]
    assert s["compression_ratio"] == pytest.approx(F32_INPUT / stored)  # 1.97: half the tokens dropped
    assert s["compression_ratio_vs_bf16"] == pytest.approx(BF16_FULL / stored)  # 0.98


def test_stats_low_rank_by_hand():
    k, v = _kv(15)
    out, s = _ratios(SVDCompressor(rank=8), k, v)
    stored = 2 * (B * H * S * 8 * 4) + 2 * (H * 8 * D * 4)  # rank-8 codes + decoders, float32
    assert stored == 40960 == out.nbytes() == s["stored_bytes"]
    assert s["compression_ratio"] == pytest.approx(F32_INPUT / stored)  # 3.2
    assert s["compression_ratio_vs_bf16"] == pytest.approx(BF16_FULL / stored)  # 1.6
    lora = LoRACompressor(hidden_size=HIDDEN, rank=16)
    out, s = _ratios(lora, k, v)
    assert isinstance(out, LowRankKV)
    stored = 2 * (B * 1 * S * 16 * 4) + 2 * (1 * 16 * HIDDEN * 4)  # one code per token of all heads
    assert stored == 32768 == out.nbytes() == s["stored_bytes"]
    assert s["compression_ratio"] == pytest.approx(F32_INPUT / stored)  # 4.0
    assert s["compression_ratio_vs_bf16"] == pytest.approx(BF16_FULL / stored)  # 2.0


def test_stats_input_bytes_follow_the_callers_dtype():
    k, v = _kv(16)
    c = FastVCompressor(drop_ratio=0.5)
    out = c(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))
    s = c.get_compression_stats()
    stored = 2 * (B * H * (S // 2) * D * 2) + B * H * (S // 2) * 4
    assert s["input_bytes"] == BF16_FULL and out.nbytes() == stored
    assert s["compression_ratio"] == s["compression_ratio_vs_bf16"] == pytest.approx(BF16_FULL / stored)


def test_every_call_is_counted_against_its_own_input():
    k, v = _kv(17)
    c = SVDCompressor(rank=8)
    a = c(k, v)
    b = c(jnp.asarray(k[:1], jnp.bfloat16), jnp.asarray(v[:1], jnp.bfloat16))
    s = c.get_compression_stats()
    assert s["input_bytes"] == F32_INPUT + F32_INPUT // 4
    assert s["compression_ratio"] == pytest.approx(s["input_bytes"] / (a.nbytes() + b.nbytes()))
