"""Rotary position embeddings (rotate-half, as Hugging Face's Llama family): inverse frequencies with
Llama-3 or linear scaling, and rotation of vectors by their own positions. Plain maths used by the
decoder, by StreamingLLM's in-cache re-indexing and by Expected Attention's future-query model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pikv_jax.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies f32[head_dim // 2], with Llama-3 or linear scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rotate(x, positions, inv_freq):
    """Rotate-half RoPE with one position per vector. x: [..., D]; positions: i32[...] (x.shape[:-1])."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [B, T, H, D]; positions: i32[B, T] shared by the heads; float32 angles."""
    return rotate(x, jnp.broadcast_to(positions[:, :, None], x.shape[:-1]), inv_freq)
