"""Compressors by name (`create_compressor`) and by CLI spec (`parse_compress_spec`).

Spec grammar (case-insensitive; components joined by "+"):

    int8 | int4 | int2 [:G[:R]]       KIVI quantization, group size G (32; 64 for int8), residual length R (64)
    svd[:R | :E]                       SVD codes of rank R (integer) or energy threshold E in (0, 1]
                                       (float, default 0.9); calibrated on the model
    lora[:R]                           LoRA codes of rank R (16), initialised from the SVD basis
    fastv[:K[:P]]                      FastV at layer K (2), dropping P of the prompt (0.5 or 50%)
    chunkkv[:RATIO[:CHUNK]]            ChunkKV keeping RATIO of the prompt (default: the policy's
                                       budget, else 0.5) in chunks of CHUNK (20) tokens
    pyramid[:RATIO[:LEVELS[:DECAY]]]   pyramid budgets (0.5, 3, 0.8)
    pikv[:M1,M2,...][@THRESHOLD]       PiKVCompressor over methods M1.. (gentlest first, each a spec;
                                       default int8,int4), importance threshold (0.5), e.g.
                                       pikv:int8,int4:32:64@0.3

Token selectors (fastv, chunkkv, pyramid) come first, a layout (int*, svd, lora, pikv) last:
"chunkkv:0.25+int4" selects chunks at prefill and stores them in int4. Every spec yields a
compressor whose `as_policy(inner=policy)` wraps the eviction policy given by --policy.
"""

from __future__ import annotations

import re

from pikv_jax.compress import spec as single
from pikv_jax.compress.base import KVCompressor
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.pikv import PiKVCompressor
from pikv_jax.compress.pyramid import PyramidCompressor
from pikv_jax.compress.spec import SELECTORS, spec_number
from pikv_jax.compress.svd import SVDCompressor

COMPRESSORS = {**single.COMPRESSORS, "pikv": PiKVCompressor}


def create_compressor(name: str, hidden_size: int | None = None, **kwargs) -> KVCompressor:
    """A compressor by name (PiKV seed's `create_compressor(type, hidden_size, **kw)`), PiKVCompressor
    included; options not accepted by that compressor raise, naming the allowed ones."""
    return single.create_compressor(name, hidden_size, registry=COMPRESSORS, **kwargs)


def compressor_from_spec(spec: str, *, hidden_size: int | None = None, model=None, default_ratio: float | None = None):
    """One spec component (no "+") -> an uncalibrated compressor."""
    spec = str(spec).strip()
    head = re.split("[:@]", spec)[0]
    if single.registry_key(head, COMPRESSORS) == "pikv":
        return _pikv_from_spec(spec[len(head):].lstrip(":"), hidden_size, model, default_ratio)
    return single.compressor_from_spec(spec, hidden_size=hidden_size, model=model, default_ratio=default_ratio)


def _pikv_from_spec(rest: str, hidden_size, model, default_ratio):
    """"M1,M2,...[@THRESHOLD]" (each Mi a spec of its own, ':' arguments allowed)."""
    cfg = getattr(model, "config", None)
    rest, _, thr = rest.partition("@")
    methods = [m.strip() for m in rest.split(",") if m.strip()] or ["int8", "int4"]
    threshold = spec_number(thr, "pikv importance threshold") if thr.strip() else 0.5
    if any(m.split(":")[0].lower() == "pikv" for m in methods):
        raise ValueError("pikv cannot contain pikv")
    if model is not None:
        methods = [compressor_from_spec(m, model=model, default_ratio=default_ratio) if m.lower().startswith("lora")
                   else m for m in methods]  # shaped for the model
    return PiKVCompressor(hidden_size, compression_methods=methods, importance_threshold=threshold,
                          num_layers=cfg.num_hidden_layers if cfg is not None else None)


class CompressorChain(KVCompressor):
    """Token selectors followed by at most one layout, applied in order by `as_policy` (generation
    only: standalone calls go to the components)."""

    name = "chain"

    def __init__(self, compressors, num_layers: int | None = None):
        super().__init__()
        self.compressors = list(compressors)
        self.num_layers = num_layers
        layouts = [i for i, c in enumerate(self.compressors) if not isinstance(c, SELECTORS)]
        if len(layouts) > 1 or (layouts and layouts[0] != len(self.compressors) - 1):
            raise ValueError("a compression spec chains token selectors (fastv, chunkkv, pyramid) followed by at most "
                             "one layout (int8/int4/int2, svd, lora, pikv), in that order")

    def compress(self, keys, values, importance=None):
        raise ValueError("a chained compression spec applies in generation only; call its components standalone")

    def as_policy(self, inner=None, *, num_layers: int | None = None):
        policy = inner
        for c in self.compressors:
            if isinstance(c, (PyramidCompressor, PiKVCompressor)):
                policy = c.as_policy(policy, num_layers=num_layers or self.num_layers)
            else:
                policy = c.as_policy(policy)
        return policy


def parse_compress_spec(spec: str, model=None, *, default_ratio: float | None = None, calibration_prompts=None,
                        calibration_tokens: int = 512):
    """A compressor for a CLI spec (see the module docstring). With a model, methods that learn from
    data (svd, lora, pikv) are calibrated on the built-in calibration text (or
    `calibration_prompts`, token id lists) and depth-dependent ones learn the model's depth."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("compression spec is empty; e.g. int8, int4, svd:32, fastv:2:0.5, chunkkv:0.25")
    comps = [compressor_from_spec(p, model=model, default_ratio=default_ratio) for p in spec.split("+")]
    num_layers = model.config.num_hidden_layers if model is not None else None
    chain = CompressorChain(comps, num_layers=num_layers)  # validates the order
    if model is not None:
        for c in comps:
            if isinstance(c, (SVDCompressor, LoRACompressor)):
                c.calibrate(model, prompts=calibration_prompts, max_tokens=calibration_tokens)
            elif isinstance(c, PiKVCompressor):
                c.calibrate(model, prompts=calibration_prompts, max_tokens=min(calibration_tokens, 256))
    return comps[0] if len(comps) == 1 else chain


__all__ = ["COMPRESSORS", "CompressorChain", "compressor_from_spec", "create_compressor", "parse_compress_spec"]
