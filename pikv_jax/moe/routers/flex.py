"""FlexMoERouter: multimodal routing, text features plus any subset of extra modalities."""

from __future__ import annotations

from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe.routers.base import BaseRouter, RouterExtraParam, per_token_features


class FlexMoERouter(BaseRouter):
    """Routing on the token's hidden state plus optional modality features (Flex-MoE style:
    samples may carry any subset of modalities, e.g. image and genomic embeddings).

    `modality_dims` fixes the modalities the router knows and their feature sizes, e.g.
    {"image": 32, "genomic": 16}. A call passes `modality_info`, a dict holding any subset of them,
    each f32[..., D_m] per token or [B, D_m] per sequence. The caller's dict is only read.

    Routing algorithm:
      1. logits[T, E] = x @ W_gate.
      2. For every known modality m present in `modality_info`: logits += feat_m @ W_m[D_m, E].
         A missing modality contributes nothing (its term is absent, not zero-filled features), so a
         text-only call routes exactly like the base top-k router on the same gate.
      3. Top-k gating, Switch load balance and z-loss as `BaseRouter`.
    Unknown modality names and features of the wrong shape raise ValueError.

    Without `modality_dims` (the seed builds `create_moe_router('flex', hidden_size=...)` and then
    passes image / genomic embeddings of the hidden width), any modality name is accepted and its
    features, f32[..., hidden_size], are scored by the token gate itself: logits += feat_m @ W_gate,
    i.e. the modality embeddings live in the token space and need no parameters of their own.
    """

    kind: ClassVar[str] = "flex"
    accepts: ClassVar[tuple[str, ...]] = ("modality_info",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 modality_dims: Mapping[str, int] | None = None, rngs: nnx.Rngs | None = None, **kw):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(hidden_size, num_experts, top_k, rngs=rngs, **kw)
        dims = dict(modality_dims or {})
        for name, d in dims.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"modality names must be identifiers, got {name!r}")
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"modality_dims[{name!r}] must be an integer >= 1, got {d!r}")
        self.modality_dims = tuple(sorted(dims.items()))  # static and hashable
        self.modality_proj = nnx.Dict({
            name: RouterExtraParam(jax.random.normal(rngs.params(), (d, num_experts), jnp.float32) * d ** -0.5)
            for name, d in self.modality_dims})

    def _logits(self, x2, inputs):
        logits = super()._logits(x2, inputs)
        info = inputs.get("modality_info")
        if info is None:
            return logits
        if not isinstance(info, Mapping):
            raise ValueError(f"modality_info must be a dict of arrays, got {type(info).__name__}")
        if not self.modality_dims:  # shared gate: modality embeddings in the token space
            for name in sorted(info):
                f2 = per_token_features(f"modality_info[{name!r}]", info[name], inputs["_lead"], self.hidden_size)
                logits = logits + self.gate(f2.astype(self.dtype)).astype(jnp.float32)
            return logits
        known = [name for name, _ in self.modality_dims]
        unknown = sorted(set(info) - set(known))
        if unknown:
            raise ValueError(f"modality_info has unknown modalities {unknown}; this router knows "
                             f"{known} (set modality_dims=...)")
        for name, d in self.modality_dims:
            feat = info.get(name)
            if feat is None:
                continue
            f2 = per_token_features(f"modality_info[{name!r}]", feat, inputs["_lead"], d)
            logits = logits + f2 @ self.modality_proj[name][...]
        return logits
