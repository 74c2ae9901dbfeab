"""`PiKVCompressor`: composes compression methods and picks one per layer from measured importance.

compression_methods lists methods from the gentlest to the most aggressive (names or specs such as
"int8", "int4", "svd:32", "lora", "pyramid", "fastv", "chunkkv", or compressor objects). Selection:
1. Importance of a layer (`calibrate(model)`): the model runs its prefill on calibration text;
   for each layer, the most aggressive method compresses that layer's keys/values at a few cut
   points of the text and the relative error of the last query's attention output against the
   exact output is measured (the damage compressing this layer alone does). Errors are normalised
   by the largest, giving importance in [0, 1]. Without calibration a depth prior
   (1 at the first layer, 0 at the last; lower layers attend broadly) stands in.
2. adaptive_selection: layers with importance >= importance_threshold get the gentlest method;
   the others spread over the remaining methods, more aggressive as importance falls. Without
   adaptive selection layers are split into contiguous blocks, one per method, in list order.
3. In generation the result is a `PerLayerPolicy`: every hook of layer l goes to that layer's
   method's policy (each method wraps the same inner eviction policy), so layers really differ in
   layout and size. Per-head choice inside a layer is not offered (a layer has one layout).
Standalone calls follow PiKV's seed: the mean of `importance` above the threshold selects the
gentlest method, else the most aggressive; no importance = the gentlest.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.attention import reference
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext
from pikv_jax.cache.state import full_bf16_bytes, tree_nbytes
from pikv_jax.compress.base import KVCompressor, check_hidden_size
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.pyramid import PyramidCompressor
from pikv_jax.compress.selection import proxy_importance, share_all
from pikv_jax.compress.spec import compressor_from_spec
from pikv_jax.compress.svd import SVDCompressor


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerLayerPolicy(CachePolicy):
    """policies: one per layer (equal policies may repeat); methods: their names (for stats)."""

    name: ClassVar[str] = "per_layer"
    policies: tuple[CachePolicy, ...] = ()
    methods: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.policies:
            raise ValueError("PerLayerPolicy needs one policy per layer")
        if self.methods and len(self.methods) != len(self.policies):
            raise ValueError(f"{len(self.methods)} method names for {len(self.policies)} layers")
        if any(p.stores_raw_keys for p in self.policies):
            raise ValueError("PerLayerPolicy cannot hold policies that re-index positions")
        reductions = {p.group_reduce for p in self.policies}
        if len(reductions) > 1:
            raise ValueError(f"per-layer policies must share one group_reduce, got {sorted(reductions)}")
        probe = jnp.asarray([1, 50, 1000], jnp.int32)
        wanted = {None if m is None else tuple(np.asarray(m).tolist())
                  for m in (p.prefill_mass_from(probe) for p in self.policies)} - {None}
        if len(wanted) > 1:
            raise ValueError("per-layer policies disagree on which prompt queries' attention mass they need")
        object.__setattr__(self, "group_reduce", self.policies[0].group_reduce)

    def _p(self, layer: int) -> CachePolicy:
        if not 0 <= layer < len(self.policies):
            raise ValueError(f"PerLayerPolicy covers {len(self.policies)} layers; layer {layer} is out of range")
        return self.policies[layer]

    @property
    def label(self) -> str:
        names = self.methods or tuple(p.label for p in self.policies)
        counts: dict[str, int] = {}
        for m in names:
            counts[m] = counts.get(m, 0) + 1
        return "pikv[" + ",".join(f"{m}x{n}" for m, n in counts.items()) + "]"

    @property
    def has_budget(self) -> bool:
        return any(p.has_budget for p in self.policies)

    @property
    def evicts(self) -> bool:
        return any(p.evicts for p in self.policies)

    def keeps_whole_prompt(self, prompt_len):
        return all(p.keeps_whole_prompt(prompt_len) for p in self.policies)

    def layer_budget(self, layer, prompt_len):
        return self._p(layer).layer_budget(layer, prompt_len)

    def row_budget(self, layer, lengths, prompt_len):
        return self._p(layer).row_budget(layer, lengths, prompt_len)

    def capacity_for(self, layer, prompt_len, max_new_tokens):
        return self._p(layer).capacity_for(layer, prompt_len, max_new_tokens)

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        return self._p(layer).init_layer_cache(layer, batch, num_kv_heads, capacity, head_dim, dtype)

    def has_room(self, layer, cache):
        return self._p(layer).has_room(layer, cache)

    def prefill_mass_from(self, lengths):
        for p in self.policies:
            m = p.prefill_mass_from(lengths)
            if m is not None:
                return m
        return None

    def prefill(self, layer: int, cache, ctx: PrefillContext, *, scores=None):
        share_all(self, layer, ctx, set())  # e.g. FastV's ranking at its layer K, whatever layer K's method
        return self._p(layer).prefill(layer, cache, ctx, scores=scores)

    def recent_window(self, budget):
        return self.policies[0].recent_window(budget)

    def eviction_scores(self, layer, cache, q_pos):
        return self._p(layer).eviction_scores(layer, cache, q_pos)

    def decode_slot(self, layer, cache, q_pos):
        return self._p(layer).decode_slot(layer, cache, q_pos)

    def new_token_score(self, layer, k, q_pos):
        return self._p(layer).new_token_score(layer, k, q_pos)

    def write(self, layer, cache, k, v, q_pos, slot, active):
        return self._p(layer).write(layer, cache, k, v, q_pos, slot, active)

    def attend(self, layer, cache, q, q_pos, *, sliding_window=None, inv_freq=None):
        return self._p(layer).attend(layer, cache, q, q_pos, sliding_window=sliding_window, inv_freq=inv_freq)

    def observe(self, layer, cache, mass, q_pos, active):
        return self._p(layer).observe(layer, cache, mass, q_pos, active)


def assign_methods(importance, n_methods: int, threshold: float, adaptive: bool) -> list[int]:
    """Method index per layer (0 = gentlest), see the module docstring."""
    n_layers = len(importance)
    if n_methods == 1:
        return [0] * n_layers
    if not adaptive:
        return [l * n_methods // n_layers for l in range(n_layers)]
    out = []
    for imp in importance:
        if imp >= threshold:
            out.append(0)
        else:
            frac = (threshold - imp) / threshold if threshold > 0 else 1.0
            out.append(1 + min(n_methods - 2, int(frac * (n_methods - 1))))
    return out


def depth_prior(n_layers: int) -> list[float]:
    return [1.0 - l / max(n_layers - 1, 1) for l in range(n_layers)]


class PiKVCompressor(KVCompressor):
    """See the module docstring. hidden_size: for seed-style standalone LoRA / pyramid methods;
    num_layers: model depth when no model is given to `calibrate`."""

    name = "pikv"

    def __init__(self, hidden_size: int | None = None, compression_methods=("lora", "pyramid"),
                 importance_threshold: float = 0.5, adaptive_selection: bool = True, *, num_layers: int | None = None):
        super().__init__()
        hidden_size = check_hidden_size(hidden_size)
        methods = list(compression_methods)
        if not methods:
            raise ValueError("compression_methods is empty: give at least one method")
        if not 0.0 <= importance_threshold <= 1.0:
            raise ValueError(f"importance_threshold must be in [0, 1], got {importance_threshold}")
        self.hidden_size = hidden_size
        self.importance_threshold, self.adaptive_selection = importance_threshold, adaptive_selection
        self.num_layers = num_layers
        self.method_names = [m.strip().lower() if isinstance(m, str) else getattr(m, "name", type(m).__name__)
                             for m in methods]
        if len(set(self.method_names)) != len(self.method_names):
            raise ValueError(f"compression_methods has duplicates: {self.method_names}")
        # a LoRA without a hidden size is shaped by calibrate(model)
        self._specs = [m if isinstance(m, str) else None for m in methods]
        self.compressors = [m if not isinstance(m, str) else None if _is_lora(m) and hidden_size is None
                            else compressor_from_spec(m, hidden_size=hidden_size) for m in methods]
        self.layer_importance: list[float] | None = None
        self.layer_methods: list[str] | None = None

    # ------------------------------------------------------------------ calibration

    def calibrate(self, model, prompts=None, *, max_tokens: int = 256, cuts: int = 4) -> "PiKVCompressor":
        """Calibrates sub-methods that learn from data (SVD, LoRA) and measures per-layer importance.
        `model`: anything with `config` and `capture_qkv(prompts, max_tokens=)`, such as PiKVModel."""
        cfg = model.config
        layers = model.capture_qkv(prompts, max_tokens=max_tokens)
        self.num_layers = len(layers)
        ks, vs = [x.k for x in layers], [x.v for x in layers]
        for i, c in enumerate(self.compressors):
            if c is None:
                c = self.compressors[i] = compressor_from_spec(self._specs[i], model=model)
            if isinstance(c, LoRACompressor) and (c.num_layers, c.num_kv_heads, c.head_dim) != (
                    cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head):
                c = self.compressors[i] = LoRACompressor.for_model(cfg, c.rank, c.alpha, c.dropout_rate)
            if isinstance(c, (SVDCompressor, LoRACompressor)):
                c.calibrate(ks, vs)
            if hasattr(c, "num_layers") and getattr(c, "num_layers", None) is None:
                c.num_layers = self.num_layers
        if self.adaptive_selection and len(self.compressors) > 1:
            c = self.compressors[-1]
            takes = _takes_layer(c)
            approx = jax.jit(lambda k, v, imp, q, layer: c.compress(k, v, imp, **({"layer": layer} if takes else {}))
                             .attend(q), static_argnums=4)
            errs = [self._layer_error(l, x, cuts, approx) for l, x in enumerate(layers)]
            top = max(errs) if max(errs) > 0 else 1.0
            self.layer_importance = [e / top for e in errs]
        self.layer_methods = None
        return self

    def _layer_error(self, layer: int, x, cuts: int, approx) -> float:
        """Mean relative error of the last query's attention output when the most aggressive method
        (`approx(k, v, importance, q, layer)`) compresses this layer's first T tokens, over `cuts`
        cut points T (first row)."""
        n = int(x.valid[0].sum())
        errs = []
        for t in sorted({max(2, n * (i + 1) // cuts) for i in range(cuts)}):
            k, v = jnp.asarray(x.k[:1, :, :t]), jnp.asarray(x.v[:1, :, :t])
            q = jnp.asarray(x.q[:1, t - 1])  # [1, H, D]
            qw = jnp.moveaxis(jnp.asarray(x.q[:1, max(0, t - 32): t]), 1, 2)  # [1, H, w, D]
            imp, exact = _importance_and_exact(k, v, q, qw)
            out = approx(k, v, imp, q, layer)
            errs.append(float(jnp.linalg.norm(out - exact) / jnp.maximum(jnp.linalg.norm(exact), 1e-12)))
        return float(np.mean(errs))

    def assignment(self, num_layers: int | None = None) -> list[str]:
        """Method name per layer."""
        n = num_layers or self.num_layers
        if n is None:
            raise ValueError("PiKVCompressor needs the model depth: call calibrate(model) or pass num_layers")
        imp = self.layer_importance if self.layer_importance and len(self.layer_importance) == n else depth_prior(n)
        idx = assign_methods(imp, len(self.compressors), self.importance_threshold, self.adaptive_selection)
        self.layer_methods = [self.method_names[i] for i in idx]
        return list(self.layer_methods)

    def as_policy(self, inner=None, *, num_layers: int | None = None) -> PerLayerPolicy:
        inner = inner if inner is not None else CachePolicy()
        names = self.assignment(num_layers)
        built = {}
        if any(c is None for c in self.compressors):
            raise ValueError("PiKVCompressor: a LoRA method without hidden_size is shaped by calibrate(model); "
                             "call it first")
        for name, c in zip(self.method_names, self.compressors):
            if name in names:
                built[name] = c.as_policy(inner, num_layers=len(names)) if isinstance(c, PyramidCompressor) \
                    else c.as_policy(inner)
        return PerLayerPolicy(policies=tuple(built[m] for m in names), methods=tuple(names))

    # ------------------------------------------------------------------ standalone

    def _choose(self, importance) -> int:
        if any(c is None for c in self.compressors):
            raise ValueError("PiKVCompressor: a LoRA method needs hidden_size (or calibrate(model)) first")
        if importance is None or not self.adaptive_selection:
            return 0
        return 0 if float(jnp.mean(jnp.asarray(importance, jnp.float32))) > self.importance_threshold \
            else len(self.compressors) - 1

    def compress(self, keys, values, importance=None):
        return self.compressors[self._choose(importance)].compress(keys, values, importance)

    def usage_name(self, importance=None) -> str:
        return self.method_names[self._choose(importance)]

    def stored_layout(self, importance=None):
        """The layout of the method a call with this importance chooses."""
        return self.compressors[self._choose(importance)].stored_layout(importance)

    def get_compression_stats(self) -> dict:
        stats = super().get_compression_stats()
        stats["methods"] = list(self.method_names)
        stats["layer_importance"] = self.layer_importance
        stats["layer_methods"] = self.layer_methods
        if self.layer_methods:
            stats["layer_method_usage"] = {m: self.layer_methods.count(m) for m in self.method_names}
        return stats

    def cache_bytes(self, config, prompt_len: int, max_new_tokens: int, *, batch: int = 1, dtype=jnp.bfloat16,
                    inner=None) -> dict:
        """Bytes each layer's cache allocates (from the real array shapes, via eval_shape) for a
        prompt of `prompt_len` and `max_new_tokens`, summed per method, against a full bf16 cache."""
        policy = self.as_policy(inner, num_layers=config.num_hidden_layers)
        per_layer = []
        for l in range(config.num_hidden_layers):
            cap = policy.capacity_for(l, prompt_len, max_new_tokens)
            shape = jax.eval_shape(lambda: policy.init_layer_cache(l, batch, config.num_key_value_heads, cap,
                                                                   config.dim_per_head, dtype))
            per_layer.append(tree_nbytes(shape))
        by_method: dict[str, int] = {}
        for m, b in zip(policy.methods, per_layer):
            by_method[m] = by_method.get(m, 0) + b
        full = full_bf16_bytes(batch * (prompt_len + max_new_tokens), num_layers=config.num_hidden_layers,
                               num_kv_heads=config.num_key_value_heads, head_dim=config.dim_per_head)
        return {"layer_bytes": per_layer, "method_bytes": by_method, "total_bytes": sum(per_layer),
                "full_bf16_bytes": full, "compression_ratio": full / sum(per_layer)}


@jax.jit
def _importance_and_exact(k, v, q, qw):
    """Observation-window importance f32[1, Hkv, T] and the exact attention output of the last query."""
    t = k.shape[2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), k.shape[:3])
    exact, _ = reference.decode_attention(q, k, v, pos, jnp.array([t - 1]))
    return proxy_importance(k, qw, qw.shape[2]), exact


def _is_lora(spec: str) -> bool:
    return spec.strip().lower().split(":")[0] == "lora"


def _takes_layer(c) -> bool:
    return "layer" in inspect.signature(c.compress).parameters
