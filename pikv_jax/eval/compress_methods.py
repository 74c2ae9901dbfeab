"""Compression methods for `pikv eval` method specs (pikv_jax/eval/methods.py), as "transforms" that
wrap the eviction policy built so far:

    int8 | int4 | int2 (group_size=, residual_length=)    "h2o@0.25+int4", "int8"
    svd (rank= | energy_threshold=), lora (rank=)          calibrated on the evaluated model
    fastv (layer=, drop_ratio=), chunkkv (chunk_size=), pyramid (num_levels=, decay_factor=)
    pikv (methods="int8,int4", threshold=0.5)

They are registered when this module is imported (pikv_jax/eval/__init__.py imports it, so any
`pikv_jax.eval` import sees them). Layouts (int*, svd,
lora, pikv) take no budget of their own: "int4@0.25" alone is rejected, give the budget to an
eviction policy ("h2o@0.25+int4"). chunkkv and pyramid use the spec's budget as their kept ratio.
"""

from __future__ import annotations

from pikv_jax.compress.chunkkv import ChunkKVCompressor
from pikv_jax.compress.fastv import FastVCompressor
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.pikv import PiKVCompressor
from pikv_jax.compress.pyramid import PyramidCompressor
from pikv_jax.compress.quantized import QuantizedCompressor
from pikv_jax.compress.svd import SVDCompressor
from pikv_jax.eval.methods import register_method

_CALIBRATED: dict = {}  # (id(model), method, options) -> calibrated compressor


def _no_budget(name, policy, budget):
    if budget is not None and not policy.has_budget:
        raise ValueError(f"{name} takes no budget of its own; give it to an eviction policy, e.g. h2o@0.25+{name}")


def _model(ctx, name):
    if getattr(ctx, "model", None) is None:
        raise ValueError(f"{name} calibrates on the evaluated model; none was given")
    return ctx.model


def _calibrated(ctx, name, options, make):
    model = _model(ctx, name)
    key = (id(model), name, tuple(sorted(options.items())))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = make(model).calibrate(model)
    return _CALIBRATED[key]


def _quantized(bits):
    def build(policy, budget, options, ctx):
        _no_budget(f"int{bits}", policy, budget)
        return QuantizedCompressor(bits=bits, **options).as_policy(policy)

    return build


def _svd(policy, budget, options, ctx):
    _no_budget("svd", policy, budget)
    return _calibrated(ctx, "svd", options, lambda m: SVDCompressor(**options)).as_policy(policy)


def _lora(policy, budget, options, ctx):
    _no_budget("lora", policy, budget)
    return _calibrated(ctx, "lora", options, lambda m: LoRACompressor.for_model(m.config, **options)).as_policy(policy)


def _pikv(policy, budget, options, ctx):
    _no_budget("pikv", policy, budget)
    opts = dict(options)
    methods = [s.strip() for s in str(opts.pop("methods", "int8,int4")).split(",")]
    threshold = float(opts.pop("threshold", 0.5))
    if opts:
        raise ValueError(f"pikv takes methods= and threshold=, got {sorted(opts)}")
    c = _calibrated(ctx, "pikv", options, lambda m: PiKVCompressor(compression_methods=methods,
                                                                   importance_threshold=threshold))
    return c.as_policy(policy, num_layers=ctx.num_layers)


def _ratio(budget):
    return None if budget is None else budget.ratio


def _fastv(policy, budget, options, ctx):
    return FastVCompressor(**options).as_policy(policy)


def _chunkkv(policy, budget, options, ctx):
    opts = dict(options)
    if budget is not None and budget.tokens is not None:
        opts.setdefault("budget_tokens", budget.tokens)
    elif _ratio(budget) is not None:
        opts.setdefault("compression_ratio", budget.ratio)
    return ChunkKVCompressor(**opts).as_policy(policy)


def _pyramid(policy, budget, options, ctx):
    opts = dict(options)
    if _ratio(budget) is not None:
        opts.setdefault("compression_ratio", budget.ratio)
    return PyramidCompressor(num_layers=ctx.num_layers, **opts).as_policy(policy)


BUILDERS = {"int8": _quantized(8), "int4": _quantized(4), "int2": _quantized(2), "svd": _svd, "lora": _lora,
            "pikv": _pikv, "fastv": _fastv, "chunkkv": _chunkkv, "pyramid": _pyramid}


for _name, _build in BUILDERS.items():
    register_method(_name, _build, role="transform", needs_budget=False, takes_budget=True)
