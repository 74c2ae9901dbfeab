"""The router protocol and the base top-k router that every other router extends.

A router maps tokens x[..., H] to a routing decision over E experts (`Routing`), and from it to the
capacity layout `(dispatch f32[T, E, C], combine f32[T, E, C], probs f32[T, E], aux_loss f32[])`.
Tokens are flattened: T = prod(x.shape[:-1]) and one call is one capacity group.

Subclasses override two hooks:
- `_logits(x2, inputs)`: router logits f32[T, E] (extra inputs such as timestamps enter here);
- `_select(logits, x2, training, key, inputs)`: probabilities, top-k choices and gates.
Auxiliary terms come from `_aux_terms`; `aux_loss = sum(coef[name] * term[name])`.

Modes: `training=False` (eval) is deterministic. `training=True` may add noise, which needs an
explicit `key` (seedable: the same key gives the same routing). Router state that changes with use
(EPLB's bias) lives in `nnx.Variable` subclasses, so it is carried by `nnx.split`/`nnx.jit`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pikv_jax.moe import losses
from pikv_jax.moe.dispatch import CapacityDispatch, capacity_dispatch, expert_capacity

GATINGS = ("softmax_topk", "topk_softmax")


class RouterExtraParam(nnx.Param):
    """A learned router parameter with no counterpart in Hugging Face MoE checkpoints.

    When a checkpoint is loaded such parameters start at zero. The routers are defined so that zero
    extras fall back to the checkpoint's gate: Flex, Time and Fast route exactly like it; Hierarchical
    keeps its probabilities (only the group limit applies); Mixture's extra heads become uniform, which
    keeps the top-k choice; Adaptive's learned importance becomes 0.5 (a mid threshold).
    """


class RouterState(nnx.Variable):
    """Non-learned router state updated while routing (e.g. EPLB's per-expert bias)."""



@struct.dataclass
class Routing:
    """One routing decision over T flattened tokens.

    logits:     f32[T, E] router logits before noise (what the z-loss sees)
    probs:      f32[T, E] router distribution (rows sum to 1)
    expert_idx: i32[T, K] chosen experts (distinct per token)
    gates:      f32[T, K] combine weight per choice (0 for inactive choices)
    active:     bool[T, K] the choice is used (adaptive routers switch off choices per token)
    aux_loss:   f32[] weighted sum of the auxiliary terms (differentiable)
    aux:        dict name -> f32[] unweighted auxiliary terms
    """

    logits: jax.Array
    probs: jax.Array
    expert_idx: jax.Array
    gates: jax.Array
    active: jax.Array
    aux_loss: jax.Array
    aux: dict[str, jax.Array]


def top_k_gating(logits, top_k: int, gating: str, normalize: bool):
    """-> (probs f32[T, E], expert_idx i32[T, K], gates f32[T, K]).

    softmax_topk (Qwen-MoE, Switch): probs = softmax(logits); take the top-k probs; renormalise them
      to sum to 1 when `normalize` (Qwen's norm_topk_prob).
    topk_softmax (Mixtral, FastMoE): take the top-k logits and softmax over those k only. This equals
      softmax_topk with normalisation, computed without the full softmax.
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if gating == "topk_softmax":
        top_logits, idx = jax.lax.top_k(logits, top_k)
        return probs, idx.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, top_k)
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, idx.astype(jnp.int32), gates


def renormalize(gates, active):
    """Gates of active choices rescaled to sum to 1 per token (inactive choices get 0)."""
    g = jnp.where(active, gates, 0.0)
    return g / jnp.maximum(jnp.sum(g, axis=-1, keepdims=True), 1e-20)


def per_token_features(name: str, value, lead: tuple[int, ...], feature_dim: int | None):
    """Validates an extra router input and flattens it to [T, D] (or [T] when feature_dim is None).

    Accepted shapes: per token `lead + (D,)`; when x is [B, S, H] also per sequence `(B, D)`
    (broadcast over the sequence) and per position `(S, D)` (broadcast over the batch; the seed's
    timestamps are one vector for all rows). Per token wins when B == S. Anything else raises, naming
    the argument and the shapes allowed.
    """
    value = jnp.asarray(value)
    tail = () if feature_dim is None else (feature_dim,)
    per_token = tuple(lead) + tail
    per_seq = (lead[0],) + tail if len(lead) == 2 else None
    per_pos = (lead[1],) + tail if len(lead) == 2 else None
    if value.shape == per_token:
        pass
    elif per_seq is not None and value.shape == per_seq:
        value = jnp.broadcast_to(value[:, None], per_token)
    elif per_pos is not None and value.shape == per_pos:
        value = jnp.broadcast_to(value[None], per_token)
    else:
        allowed = f"{per_token} (per token)" + (f", {per_seq} (per sequence) or {per_pos} (per position)"
                                                 if per_seq else "")
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {allowed}")
    if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"{name} must be a numeric array, got dtype {value.dtype}")
    n = 1
    for d in lead:
        n *= d
    return value.reshape((n,) + tail).astype(jnp.float32)


class BaseRouter(nnx.Module):
    """Top-k router with the Switch load-balancing loss and the ST-MoE router z-loss.

    Routing algorithm:
      1. logits[T, E] = x[T, H] @ W_gate[H, E] (float32).
      2. Training only, with noise_std > 0: logits += noise_std * N(0, 1) drawn from `key`.
      3. Gating (see `top_k_gating`): probs[T, E], expert_idx[T, K], gates[T, K].
      4. Auxiliary loss = load_balance_coef * E * sum_e f_e P_e + z_loss_coef * mean(logsumexp(logits)^2).
      5. Capacity C = ceil(cf * T * K / E) with cf = capacity_factor in training and
         eval_capacity_factor in evaluation; `capacity_dispatch` drops what does not fit.
    """

    kind: ClassVar[str] = "base"
    accepts: ClassVar[tuple[str, ...]] = ()  # names of extra call inputs this router understands

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, gating: str = "softmax_topk",
                 normalize_topk: bool = True, capacity_factor: float = 1.25,
                 eval_capacity_factor: float | None = None, min_capacity: int = 1, noise_std: float = 0.0,
                 load_balance_coef: float = 0.01, z_loss_coef: float = 0.001, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}; allowed: 1..{num_experts}")
        if gating not in GATINGS:
            raise ValueError(f"gating={gating!r} is not supported; allowed: {GATINGS}")
        for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.gating, self.normalize_topk = gating, normalize_topk
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
        self.min_capacity = min_capacity
        self.noise_std = noise_std
        self.aux_coefs: tuple[tuple[str, float], ...] = ()  # static (hashable) name -> weight pairs
        self.set_aux_coefs(load_balance=load_balance_coef, z_loss=z_loss_coef)
        self.dtype = dtype
        self.gate = nnx.Linear(hidden_size, num_experts, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def set_aux_coefs(self, **coefs: float):
        """Sets the weights of named auxiliary terms in aux_loss (terms without a weight count 0)."""
        for name, c in coefs.items():
            if not c >= 0:
                raise ValueError(f"the weight of auxiliary term {name!r} must be >= 0, got {c}")
        merged = dict(self.aux_coefs, **{k: float(v) for k, v in coefs.items()})
        self.aux_coefs = tuple(sorted(merged.items()))

    def aux_coef(self, name: str) -> float:
        return dict(self.aux_coefs).get(name, 0.0)

    # ------------------------------------------------------------------ hooks

    def _logits(self, x2, inputs: Mapping[str, Any]):
        """x2: [T, H] -> f32[T, E]."""
        return self.gate(x2.astype(self.dtype)).astype(jnp.float32)

    def _select(self, logits, x2, training: bool, key, inputs: Mapping[str, Any]):
        """-> (probs f32[T, E], expert_idx i32[T, K], gates f32[T, K], active bool[T, K], extra aux dict)."""
        probs, idx, gates = top_k_gating(logits, self.top_k, self.gating, self.normalize_topk)
        return probs, idx, gates, jnp.ones(idx.shape, bool), {}

    def _aux_terms(self, logits, probs, expert_idx, active) -> dict[str, jax.Array]:
        return {"load_balance": losses.switch_load_balancing_loss(probs, expert_idx, active),
                "z_loss": losses.router_z_loss(logits)}

    # ------------------------------------------------------------------ public

    def _check_inputs(self, inputs: Mapping[str, Any]):
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in self.accepts)
        if extra:
            raise ValueError(f"router {self.kind!r} does not take {extra}; it accepts "
                             f"{list(self.accepts) or 'no extra inputs'}")

    def route(self, x, *, training: bool = False, key=None, **inputs) -> Routing:
        """x: [..., H] -> Routing over T = prod(x.shape[:-1]) tokens."""
        self._check_inputs(inputs)
        if x.ndim < 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., hidden_size={self.hidden_size}] "
                             "with at least one leading (token) axis")
        inputs = dict(inputs, _lead=tuple(x.shape[:-1]))  # a new dict: the caller's is never mutated
        x2 = x.reshape(-1, self.hidden_size)
        clean = self._logits(x2, inputs)
        logits = clean
        if training and self.noise_std > 0:
            if key is None:
                raise ValueError(f"router {self.kind!r} has noise_std={self.noise_std} and needs key= in training")
            key, sub = jax.random.split(key)
            logits = clean + self.noise_std * jax.random.normal(sub, clean.shape, jnp.float32)
        probs, idx, gates, active, extra = self._select(logits, x2, training, key, inputs)
        gates = jnp.where(active, gates, 0.0)
        aux = dict(self._aux_terms(clean, probs, idx, active), **extra)
        aux_loss = sum((jnp.float32(self.aux_coef(n)) * v for n, v in aux.items()), jnp.float32(0.0))
        return Routing(logits=clean, probs=probs, expert_idx=idx, gates=gates, active=active,
                       aux_loss=aux_loss, aux=aux)

    def capacity(self, num_tokens: int, training: bool = False) -> int:
        cf = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, self.top_k, cf, min_capacity=self.min_capacity)

    def plan(self, x, *, training: bool = False, key=None, capacity: int | None = None,
             **inputs) -> tuple[Routing, CapacityDispatch]:
        """Routing plus its capacity layout (which also counts dropped assignments)."""
        routing = self.route(x, training=training, key=key, **inputs)
        t = routing.expert_idx.shape[0]
        cap = self.capacity(t, training) if capacity is None else int(capacity)
        if cap < 1:
            raise ValueError(f"capacity must be >= 1, got {cap}")
        return routing, capacity_dispatch(routing.expert_idx, routing.gates, routing.active, self.num_experts, cap)

    def positional_inputs(self, extra) -> dict[str, Any]:
        """The seed's positional extra input, `router(x, modality_info)` / `router(x, time_info)`, as
        keyword inputs: a dict whose keys are all inputs this router accepts is spread
        ({"timestamps": t, "seasonality": s}); anything else is this router's single accepted input."""
        if isinstance(extra, Mapping) and extra and all(k in self.accepts for k in extra):
            return dict(extra)
        if len(self.accepts) == 1:
            return {self.accepts[0]: extra}
        raise ValueError(f"router {self.kind!r} takes {list(self.accepts) or 'no extra inputs'}; pass them by "
                         "keyword or as a dict keyed by those names")

    def __call__(self, x, extra=None, *, training: bool = False, key=None, capacity: int | None = None, **inputs):
        """-> (dispatch f32[T, E, C], combine f32[T, E, C], probs f32[T, E], aux_loss f32[]).

        `extra`: the seed's positional extra input (see `positional_inputs`); keywords work too."""
        if extra is not None:
            inputs = dict(self.positional_inputs(extra), **inputs)
        routing, plan = self.plan(x, training=training, key=key, capacity=capacity, **inputs)
        return plan.dispatch, plan.combine, routing.probs, routing.aux_loss


TopKRouter = BaseRouter

__all__ = ["BaseRouter", "GATINGS", "RouterExtraParam", "RouterState", "Routing", "TopKRouter",
           "per_token_features", "renormalize", "top_k_gating"]
