"""Expert feed-forward networks: E SwiGLU experts stacked on a leading axis, optionally LoRA-adapted.

expert_e(x) = down_e(silu(gate_e(x)) * up_e(x)), and with LoRA of rank r each projection W_e becomes
W_e + (alpha / r) * A_e @ B_e (A_e: [in, r], B_e: [r, out]; B starts at zero, so a fresh adapter
leaves the base expert unchanged, as in Hu et al. 2021).

The math lives in free functions of a weight dict so that the same code runs on a single device, on
the expert-local slice inside `shard_map`, and as the dense reference:
- `experts_capacity(w, x[E, C, H])`: capacity layout, one batched einsum per projection;
- `experts_ragged(w, x[M, H], group_sizes[E])`: dropless layout through `jax.lax.ragged_dot`;
- `experts_all_tokens(w, x[T, H])`: every expert on every token (the dense reference, [E, T, H]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """A LoRA adapter factor (A or B) of an expert projection."""


def _project_dense(w: dict, name: str, x, eq: str, scale: float):
    """x @ W (+ scale * x @ A @ B) for stacked weights; `eq` is the einsum of x with W."""
    y = jnp.einsum(eq, x, w[name].astype(x.dtype))
    if name + "_lora_a" in w:
        a, b = w[name + "_lora_a"].astype(x.dtype), w[name + "_lora_b"].astype(x.dtype)
        y = y + scale * jnp.einsum(eq, jnp.einsum(eq, x, a), b)
    return y


def experts_capacity(w: dict, x, lora_scale: float = 1.0):
    """x: [E, C, H] (expert e's C slots) -> [E, C, H]."""
    eq = "eci,eio->eco"
    h = jax.nn.silu(_project_dense(w, "gate_proj", x, eq, lora_scale)) * _project_dense(w, "up_proj", x, eq, lora_scale)
    return _project_dense(w, "down_proj", h, eq, lora_scale)


def experts_all_tokens(w: dict, x, lora_scale: float = 1.0):
    """x: [T, H] -> [E, T, H]: every expert applied to every token (dense reference)."""
    e = w["gate_proj"].shape[0]
    return experts_capacity(w, jnp.broadcast_to(x[None], (e,) + x.shape), lora_scale)


def _project_ragged(w: dict, name: str, x, group_sizes, scale: float):
    rd = jax.lax.ragged_dot
    y = rd(x, w[name].astype(x.dtype), group_sizes)
    if name + "_lora_a" in w:
        a, b = w[name + "_lora_a"].astype(x.dtype), w[name + "_lora_b"].astype(x.dtype)
        y = y + scale * rd(rd(x, a, group_sizes), b, group_sizes)
    return y


def experts_ragged(w: dict, x, group_sizes, lora_scale: float = 1.0):
    """x: [M, H] rows sorted by expert, group_sizes: i32[E] -> [M, H] (rows past the groups are junk)."""
    h = (jax.nn.silu(_project_ragged(w, "gate_proj", x, group_sizes, lora_scale))
         * _project_ragged(w, "up_proj", x, group_sizes, lora_scale))
    return _project_ragged(w, "down_proj", h, group_sizes, lora_scale)


class Experts(nnx.Module):
    """E stacked SwiGLU experts. Parameters: gate_proj, up_proj [E, H, F]; down_proj [E, F, H];
    with `lora_rank` r > 0 also {proj}_lora_a [E, in, r] and {proj}_lora_b [E, r, out] (LoRAParam)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, lora_rank: int = 0,
                 lora_alpha: float = 1.0, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")
        if lora_rank < 0:
            raise ValueError(f"rank must be >= 0 (0 = no LoRA), got {lora_rank}")
        if lora_rank and not lora_alpha > 0:
            raise ValueError(f"alpha must be > 0, got {lora_alpha}")
        param_dtype = dtype if param_dtype is None else param_dtype
        e, h, f = num_experts, hidden_size, intermediate_size
        shapes = {"gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
        for name, (i, o) in shapes.items():
            w = jax.random.normal(rngs.params(), (e, i, o), jnp.float32) * i ** -0.5
            setattr(self, name, nnx.Param(w.astype(param_dtype)))
            if lora_rank:
                a = jax.random.normal(rngs.params(), (e, i, lora_rank), jnp.float32) * i ** -0.5
                setattr(self, name + "_lora_a", LoRAParam(a.astype(param_dtype)))
                setattr(self, name + "_lora_b", LoRAParam(jnp.zeros((e, lora_rank, o), param_dtype)))
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, f
        self.lora_rank = lora_rank
        self.lora_scale = float(lora_alpha) / lora_rank if lora_rank else 1.0
        self.dtype = dtype

    def weights(self) -> dict:
        """Name -> stacked array (the input of the free functions above)."""
        names = [p for p in PROJECTIONS]
        if self.lora_rank:
            names += [p + s for p in PROJECTIONS for s in ("_lora_a", "_lora_b")]
        return {n: getattr(self, n)[...] for n in names}

    def capacity(self, x):
        return experts_capacity(self.weights(), x.astype(self.dtype), self.lora_scale)

    def ragged(self, x, group_sizes):
        return experts_ragged(self.weights(), x.astype(self.dtype), group_sizes, self.lora_scale)

    def all_tokens(self, x):
        return experts_all_tokens(self.weights(), x.astype(self.dtype), self.lora_scale)


class SharedExpert(nnx.Module):
    """A dense SwiGLU MLP every token goes through (Qwen-MoE's shared expert), gated per token by
    sigmoid(x @ w_gate) when `gated`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32, param_dtype=None,
                 rngs: nnx.Rngs):
        param_dtype = dtype if param_dtype is None else param_dtype
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(hidden_size, intermediate_size, **lin)
        self.up_proj = nnx.Linear(hidden_size, intermediate_size, **lin)
        self.down_proj = nnx.Linear(intermediate_size, hidden_size, **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


__all__ = ["Experts", "LoRAParam", "PROJECTIONS", "SharedExpert", "experts_all_tokens", "experts_capacity",
           "experts_ragged"]
