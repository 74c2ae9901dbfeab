"""Single compression methods by name and by spec component ("int4:32:128", "svd:0.9",
"chunkkv:0.25:20"); the grammar is in factory.py, which adds the composite PiKVCompressor and
chains. Kept apart so PiKVCompressor can build its sub-methods without importing the factory."""

from __future__ import annotations

import inspect

from pikv_jax.compress.base import KVCompressor
from pikv_jax.compress.chunkkv import ChunkKVCompressor
from pikv_jax.compress.fastv import FastVCompressor
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.pyramid import PyramidCompressor
from pikv_jax.compress.quantized import QuantizedCompressor
from pikv_jax.compress.svd import SVDCompressor

COMPRESSORS = {"int8": QuantizedCompressor, "int4": QuantizedCompressor, "int2": QuantizedCompressor,
               "quantized": QuantizedCompressor, "svd": SVDCompressor, "lora": LoRACompressor,
               "fastv": FastVCompressor, "chunkkv": ChunkKVCompressor, "pyramid": PyramidCompressor}
SELECTORS = (FastVCompressor, ChunkKVCompressor, PyramidCompressor)


def registry_key(name: str, registry=None) -> str:
    registry = COMPRESSORS if registry is None else registry
    key = str(name).strip().lower().replace("-", "_")
    if key not in registry:
        raise ValueError(f"unknown compressor {name!r}; allowed: {sorted(registry)}")
    return key


def create_compressor(name: str, hidden_size: int | None = None, *, registry=None, **kwargs) -> KVCompressor:
    """A compressor by name (PiKV seed's `create_compressor(type, hidden_size, **kw)`); options not
    accepted by that compressor raise, naming the allowed ones. `registry` extends the single
    methods with composite ones (factory.py adds PiKVCompressor)."""
    registry = COMPRESSORS if registry is None else registry
    key = registry_key(name, registry)
    cls = registry[key]
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


def spec_number(text: str, what: str, kind=float):
    t = text.strip()
    try:
        if t.endswith("%") and kind is float:
            return float(t[:-1]) / 100.0
        return kind(t)
    except ValueError:
        raise ValueError(f"{what} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def spec_kwargs(args, fields, default_ratio: float | None = None) -> dict:
    """A spec's ':' arguments as keyword arguments: argument i is fields[i] = (keyword, what, kind).
    An empty compression_ratio argument is left out; a left-out one is `default_ratio` (if given)."""
    kw = {}
    for text, (name, what, kind) in zip(args, fields):
        if name != "compression_ratio" or text:
            kw[name] = spec_number(text, what, kind)
    if default_ratio is not None and "compression_ratio" not in kw and fields[0][0] == "compression_ratio":
        kw["compression_ratio"] = default_ratio
    return kw


def compressor_from_spec(spec: str, *, hidden_size: int | None = None, model=None, default_ratio: float | None = None):
    """One single-method spec component (no "+", not pikv) -> an uncalibrated compressor."""
    spec = str(spec).strip()
    parts = [p.strip() for p in spec.split(":")]
    key, args = registry_key(parts[0]), parts[1:]
    cfg = getattr(model, "config", None)

    def arity(n):
        if len(args) > n:
            raise ValueError(f"{key} takes at most {n} ':' arguments, got {spec!r}")

    if key in ("int8", "int4", "int2", "quantized"):
        arity(2)
        kw = spec_kwargs(args, [("group_size", f"{key} group size", int),
                                ("residual_length", f"{key} residual length", int)])
        c = create_compressor(key if key != "quantized" else "int4", **kw)
        if cfg is not None:
            c.as_policy().check_head_dim(cfg.dim_per_head)
        return c
    if key == "svd":
        arity(1)
        if not args:
            return SVDCompressor()
        if "." in args[0]:
            return SVDCompressor(energy_threshold=spec_number(args[0], "svd energy threshold"))
        return SVDCompressor(rank=spec_number(args[0], "svd rank", int))
    if key == "lora":
        arity(1)
        rank = spec_number(args[0], "lora rank", int) if args else 16
        if cfg is not None:
            return LoRACompressor.for_model(cfg, rank=rank)
        if hidden_size is None:
            raise ValueError("lora needs a model (or hidden_size) to shape its projections")
        return LoRACompressor(hidden_size, rank=rank)
    if key == "fastv":
        arity(2)
        return FastVCompressor(**spec_kwargs(args, [("layer", "fastv layer K", int),
                                                    ("drop_ratio", "fastv drop ratio", float)]))
    if key == "chunkkv":
        arity(2)
        return ChunkKVCompressor(**spec_kwargs(args, [("compression_ratio", "chunkkv ratio", float),
                                                      ("chunk_size", "chunkkv chunk size", int)], default_ratio))
    if key == "pyramid":
        arity(3)
        kw = spec_kwargs(args, [("compression_ratio", "pyramid ratio", float), ("num_levels", "pyramid levels", int),
                                ("decay_factor", "pyramid decay factor", float)], default_ratio)
        return PyramidCompressor(hidden_size, num_layers=cfg.num_hidden_layers if cfg is not None else None, **kw)
    raise AssertionError(key)


__all__ = ["COMPRESSORS", "SELECTORS", "compressor_from_spec", "create_compressor"]
