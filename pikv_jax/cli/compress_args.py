"""`--compress` for `pikv generate` (and any command that builds a cache policy).

    add_compress_args(parser)                  registers the flags
    validate_compress_args(args)               checks the spec before the model loads
    policy = apply_compress(args, policy, model)   wraps the --policy policy

The spec grammar is in pikv_jax/compress/factory.py; `pikv generate --help` shows a summary.
"""

from __future__ import annotations

import argparse

from pikv_jax.compress.factory import CompressorChain, compressor_from_spec, parse_compress_spec
from pikv_jax.runtime.capture import calibration_ids

COMPRESS_HELP = (
    "KV compression, combinable with --policy/--budget: int8 | int4 | int2 [:GROUP[:RESIDUAL]] (KIVI, default "
    "32:128); svd:RANK or svd:ENERGY (e.g. svd:32, svd:0.9); lora:RANK; fastv[:K[:DROP]] (e.g. fastv:2:0.5); "
    "chunkkv[:RATIO[:CHUNK]]; pyramid[:RATIO[:LEVELS[:DECAY]]]; pikv[:M1,M2,...][@THRESHOLD] (methods "
    "gentlest first, e.g. pikv:int8,int4@0.5). "
    "Selectors and a layout chain with '+', e.g. chunkkv:0.25+int4. svd, lora and pikv calibrate on the model's "
    "own keys/values for built-in calibration text (the opening of pikv_jax/data/haystack_varied.txt, or "
    "--calibration-text), which takes a few seconds before generation.")


def add_compress_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("compression")
    g.add_argument("--compress", default=None, metavar="SPEC", help=COMPRESS_HELP)
    g.add_argument("--calibration-tokens", type=int, default=512,
                   help="tokens of calibration text for svd/lora/pikv (default 512)")
    g.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="a text file to calibrate svd/lora/pikv on instead of the built-in text")


def _default_ratio(args):
    return getattr(args, "budget", None)


def validate_compress_args(args) -> None:
    """Parses the spec without a model (bad names, arguments and ranges raise ValueError)."""
    spec = getattr(args, "compress", None)
    if spec is None:
        return
    if getattr(args, "calibration_tokens", 512) < 2:
        raise ValueError(f"--calibration-tokens must be >= 2, got {args.calibration_tokens}")

    comps = []
    for part in spec.split("+"):
        if part.strip().lower().startswith("lora"):  # shaped by the model; check the grammar only
            compressor_from_spec(part, hidden_size=4096, default_ratio=_default_ratio(args))
            comps.append(None)
        else:
            comps.append(compressor_from_spec(part, default_ratio=_default_ratio(args)))
    CompressorChain([c for c in comps if c is not None])


def apply_compress(args, policy, model):
    """The policy wrapped by the --compress spec (unchanged when --compress is not given)."""
    spec = getattr(args, "compress", None)
    if spec is None:
        return policy

    validate_compress_args(args)
    prompts = None
    if getattr(args, "calibration_text", None):
        with open(args.calibration_text, encoding="utf-8") as f:
            prompts = [calibration_ids(model, args.calibration_tokens, text=f.read())]
    compressor = parse_compress_spec(spec, model, default_ratio=_default_ratio(args), calibration_prompts=prompts,
                                     calibration_tokens=getattr(args, "calibration_tokens", 512))
    return compressor.as_policy(inner=policy)
