"""Compressors by name (`create_compressor`) and by CLI spec (`parse_compress_spec`).

Spec grammar (case-insensitive; components joined by "+"):

    int8 | int4 | int2 [:G[:R]]       KIVI quantization, group size G (32), residual length R (128)
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

import inspect
import re

from pikv_jax.compress.base import KVCompressor
from pikv_jax.compress.chunkkv import ChunkKVCompressor
from pikv_jax.compress.fastv import FastVCompressor
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.svd import SVDCompressor
from pikv_jax.compress.pikv import PiKVCompressor
from pikv_jax.compress.pyramid import PyramidCompressor
from pikv_jax.compress.quantized import QuantizedCompressor

COMPRESSORS = {"int8": QuantizedCompressor, "int4": QuantizedCompressor, "int2": QuantizedCompressor,
               "quantized": QuantizedCompressor, "svd": SVDCompressor, "lora": LoRACompressor,
               "fastv": FastVCompressor, "chunkkv": ChunkKVCompressor, "pyramid": PyramidCompressor,
               "pikv": PiKVCompressor}
SELECTORS = (FastVCompressor, ChunkKVCompressor, PyramidCompressor)


def _key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; allowed: {sorted(COMPRESSORS)}")
    return key


def create_compressor(name: str, hidden_size: int | None = None, **kwargs) -> KVCompressor:
    """A compressor by name (PiKV seed's `create_compressor(type, hidden_size, **kw)`); options not
    accepted by that compressor raise, naming the allowed ones."""
    key = _key(name)
    cls = COMPRESSORS[key]
    if key in ("int8", "int4", "int2"):
        bits = int(key[3:])
        if kwargs.get("bits", bits) != bits:
            raise ValueError(f"{key} means bits={bits}; got bits={kwargs['bits']}")
        kwargs["bits"] = bits
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(p for p in params if p not in ("self", "rngs"))
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"compressor {key!r} does not take {unknown}; allowed options: {allowed}")
    if "hidden_size" in params:
        if key == "lora" and hidden_size is None and "hidden_size" not in kwargs:
            raise ValueError("lora needs hidden_size (Hkv * head_dim, or the seed's hidden size)")
        if hidden_size is not None:
            kwargs["hidden_size"] = hidden_size
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- specs


def _num(text: str, what: str, kind=float):
    t = text.strip()
    try:
        if t.endswith("%") and kind is float:
            return float(t[:-1]) / 100.0
        return kind(t)
    except ValueError:
        raise ValueError(f"{what} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def compressor_from_spec(spec: str, *, hidden_size: int | None = None, model=None, default_ratio: float | None = None):
    """One spec component (no "+") -> an uncalibrated compressor."""
    spec = str(spec).strip()
    head = re.split("[:@]", spec)[0]
    if _key(head) == "pikv":
        return _pikv_from_spec(spec[len(head):].lstrip(":"), hidden_size, model, default_ratio)
    parts = [p.strip() for p in spec.split(":")]
    key, args = _key(parts[0]), parts[1:]
    cfg = getattr(model, "config", None)

    def arity(n):
        if len(args) > n:
            raise ValueError(f"{key} takes at most {n} ':' arguments, got {spec!r}")

    if key in ("int8", "int4", "int2", "quantized"):
        arity(2)
        kw = {}
        if args:
            kw["group_size"] = _num(args[0], f"{key} group size", int)
        if len(args) > 1:
            kw["residual_length"] = _num(args[1], f"{key} residual length", int)
        c = create_compressor(key if key != "quantized" else "int4", **kw)
        if cfg is not None:
            c.as_policy().check_head_dim(cfg.dim_per_head)
        return c
    if key == "svd":
        arity(1)
        if not args:
            return SVDCompressor()
        if "." in args[0]:
            return SVDCompressor(energy_threshold=_num(args[0], "svd energy threshold"))
        return SVDCompressor(rank=_num(args[0], "svd rank", int))
    if key == "lora":
        arity(1)
        rank = _num(args[0], "lora rank", int) if args else 16
        if cfg is not None:
            return LoRACompressor.for_model(cfg, rank=rank)
        if hidden_size is None:
            raise ValueError("lora needs a model (or hidden_size) to shape its projections")
        return LoRACompressor(hidden_size, rank=rank)
    if key == "fastv":
        arity(2)
        kw = {}
        if args:
            kw["layer"] = _num(args[0], "fastv layer K", int)
        if len(args) > 1:
            kw["drop_ratio"] = _num(args[1], "fastv drop ratio")
        return FastVCompressor(**kw)
    if key == "chunkkv":
        arity(2)
        kw = {}
        if args and args[0]:
            kw["compression_ratio"] = _num(args[0], "chunkkv ratio")
        elif default_ratio is not None:
            kw["compression_ratio"] = default_ratio
        if len(args) > 1:
            kw["chunk_size"] = _num(args[1], "chunkkv chunk size", int)
        return ChunkKVCompressor(**kw)
    if key == "pyramid":
        arity(3)
        kw = {"num_layers": cfg.num_hidden_layers if cfg is not None else None}
        if args and args[0]:
            kw["compression_ratio"] = _num(args[0], "pyramid ratio")
        elif default_ratio is not None:
            kw["compression_ratio"] = default_ratio
        if len(args) > 1:
            kw["num_levels"] = _num(args[1], "pyramid levels", int)
        if len(args) > 2:
            kw["decay_factor"] = _num(args[2], "pyramid decay factor")
        return PyramidCompressor(hidden_size, **kw)
    raise AssertionError(key)


def _pikv_from_spec(rest: str, hidden_size, model, default_ratio):
    """"M1,M2,...[@THRESHOLD]" (each Mi a spec of its own, ':' arguments allowed)."""
    cfg = getattr(model, "config", None)
    rest, _, thr = rest.partition("@")
    methods = [m.strip() for m in rest.split(",") if m.strip()] or ["int8", "int4"]
    threshold = _num(thr, "pikv importance threshold") if thr.strip() else 0.5
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
