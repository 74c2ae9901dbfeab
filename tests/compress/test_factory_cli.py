"""create_compressor, the --compress spec grammar and the CLI helpers (add_compress_args,
validate_compress_args, apply_compress)."""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest
from compress_helpers import random_prompts, tiny_model

from pikv_jax.cache.policies import H2O, CachePolicy
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.cli.compress_args import add_compress_args, apply_compress, validate_compress_args
from pikv_jax.compress import (
    ChunkKVCompressor,
    CompressorChain,
    FastVCompressor,
    LoRACompressor,
    PiKVCompressor,
    QuantizedCompressor,
    create_compressor,
    parse_compress_spec,
)
from pikv_jax.compress.chunkkv import ChunkKVPolicy
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.compress.lowrank import LowRankPolicy
from pikv_jax.eval.methods import parse_method


def test_create_compressor_by_name():
    assert create_compressor("int8").bits == 8
    assert create_compressor("INT4", group_size=16).group_size == 16
    assert create_compressor("int2").bits == 2
    assert create_compressor("quantized", bits=4).bits == 4
    assert create_compressor("svd", rank=8).rank == 8
    assert create_compressor("lora", 64, rank=8).rank == 8
    assert isinstance(create_compressor("fastv", layer=1), FastVCompressor)
    assert isinstance(create_compressor("chunkkv", chunk_size=10), ChunkKVCompressor)
    assert create_compressor("pyramid", 576, num_levels=4).num_levels == 4
    assert create_compressor("pikv", compression_methods=["int8", "int4"]).method_names == ["int8", "int4"]
    with pytest.raises(ValueError, match="unknown compressor 'zip'; allowed"):
        create_compressor("zip")
    with pytest.raises(ValueError, match=r"does not take \['ranks'\]; allowed options"):
        create_compressor("svd", ranks=3)
    with pytest.raises(ValueError, match="int8 means bits=8"):
        create_compressor("int8", bits=4)
    with pytest.raises(ValueError, match="lora needs hidden_size"):
        create_compressor("lora")


def test_spec_grammar():
    c = parse_compress_spec("int8")
    assert isinstance(c, QuantizedCompressor) and (c.bits, c.group_size, c.residual_length) == (8, 64, 64)
    c = parse_compress_spec("int4:16:64")
    assert (c.bits, c.group_size, c.residual_length) == (4, 16, 64)
    assert parse_compress_spec("svd:32").rank == 32
    c = parse_compress_spec("svd:0.9")
    assert c.rank is None and c.energy_threshold == 0.9
    c = parse_compress_spec("fastv:3:50%")
    assert (c.layer, c.drop_ratio) == (3, 0.5)
    c = parse_compress_spec("chunkkv:0.25:10")
    assert (c.compression_ratio, c.chunk_size) == (0.25, 10)
    c = parse_compress_spec("pyramid:0.4:2:0.5")
    assert (c.compression_ratio, c.num_levels, c.decay_factor) == (0.4, 2, 0.5)
    c = parse_compress_spec("pikv:int8,int4:16:64@0.3")
    assert isinstance(c, PiKVCompressor) and c.method_names == ["int8", "int4:16:64"]
    assert c.importance_threshold == 0.3 and c.compressors[1].group_size == 16
    assert parse_compress_spec("pikv").method_names == ["int8", "int4"]
    c = parse_compress_spec("chunkkv:0.25+int4")
    assert isinstance(c, CompressorChain)
    p = c.as_policy(H2O(budget_ratio=0.5))
    assert isinstance(p, QuantizedPolicy) and isinstance(p.inner, ChunkKVPolicy) and p.inner.inner == H2O(
        budget_ratio=0.5)
    assert p.label == "h2o+chunkkv:0.25:20+int4"
    assert parse_compress_spec("chunkkv", default_ratio=0.3).compression_ratio == 0.3


@pytest.mark.parametrize("spec, match", [
    ("int3", "unknown compressor"), ("svd:abc", "svd rank must be an integer"),
    ("svd:0.0", r"energy_threshold must be in \(0, 1\]"), ("svd:1.5", r"energy_threshold must be in \(0, 1\]"),
    ("svd:0", "rank must be an integer >= 1"), ("int4:32:48", "residual_length=48 must be a positive multiple"),
    ("int4+chunkkv", "followed by at most one layout"), ("int4+int8", "followed by at most one layout"),
    ("fastv:1:0.5:3", "at most 2"), ("", "empty"), ("lora:8", "needs a model"), ("fastv:2:1.5", "drop_ratio"),
    ("pikv:int8,pikv", "pikv cannot contain pikv")])
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_compress_spec(spec)


def test_specs_with_a_model_are_shaped_and_calibrated():
    model = tiny_model()
    prompts = random_prompts((30, 45), seed=1)
    svd = parse_compress_spec("svd:4", model, calibration_prompts=prompts)
    assert svd.bases.num_layers == 2 and svd.bases.ranks(1) == (4, 4)
    lora = parse_compress_spec("lora:4", model, calibration_prompts=prompts)
    assert isinstance(lora, LoRACompressor) and lora.k_down.value.shape == (2, 2, 16, 4)
    for a, b in zip(lora.bases().layer(1), svd.bases.layer(1)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert parse_compress_spec("pyramid", model).num_layers == 2
    with pytest.raises(ValueError, match="must divide the head dimension 16"):
        parse_compress_spec("int4", model)  # G = 32 > head dim 16


def _args(*argv, budget=None):
    parser = argparse.ArgumentParser()
    add_compress_args(parser)
    args = parser.parse_args(list(argv))
    args.budget = budget
    return args, parser


def test_cli_flags():
    args, parser = _args("--compress", "int4:8:16")
    assert "calibrat" in parser.format_help()
    model = tiny_model()
    policy = apply_compress(args, H2O(budget_ratio=0.5), model)
    assert isinstance(policy, QuantizedPolicy) and policy.label == "h2o+int4"
    assert apply_compress(_args()[0], H2O(budget_ratio=0.5), model) == H2O(budget_ratio=0.5)
    with pytest.raises(ValueError, match="unknown compressor"):
        validate_compress_args(_args("--compress", "int5")[0])
    with pytest.raises(ValueError, match="calibration-tokens"):
        validate_compress_args(_args("--compress", "svd:8", "--calibration-tokens", "1")[0])
    validate_compress_args(_args("--compress", "chunkkv+lora:8")[0])
    # svd calibrates on the model (a model without a tokenizer: seeded random ids)
    policy = apply_compress(_args("--compress", "svd:8", "--calibration-tokens", "64")[0], CachePolicy(), model)
    assert isinstance(policy, LowRankPolicy) and policy.bases.ranks(0) == (8, 8) and policy.bases.num_layers == 2
    # --budget sets the pyramid's ratio when the spec gives none
    assert apply_compress(_args("--compress", "pyramid", budget=0.3)[0], H2O(budget_ratio=0.3), model).ratios[0] == 0.3


def test_generate_stats_report_the_bytes_allocated():
    model = tiny_model()
    policy = apply_compress(_args("--compress", "int8:8:16")[0], CachePolicy(), model)
    out = model.generate(random_prompts((30, 45), seed=2), 6, policy=policy, stop_ids=())
    caps = tuple(policy.capacity_for(i, 64, 6) for i in range(2))
    shape = jax.eval_shape(lambda: init_policy_cache(policy, 2, caps, num_kv_heads=2, head_dim=16,
                                                     dtype=model.cache_dtype))
    assert out.stats["cache_bytes"] == shape.nbytes() == sum(np.prod(x.shape) * x.dtype.itemsize
                                                             for x in jax.tree_util.tree_leaves(shape))
    assert out.stats["policy"] == "int8"


def test_eval_method_specs():
    """Importing the eval layer (this module's import of parse_method) registers the compression
    transforms (no explicit call)."""
    m = parse_method("h2o@0.25+int4(group_size=8,residual_length=16)", num_layers=2)
    assert isinstance(m.policy, QuantizedPolicy) and m.policy.inner == H2O(budget_ratio=0.25)
    assert m.policy.bits == 4 and m.policy.group_size == 8
    m = parse_method("chunkkv(chunk_size=10)@0.3", num_layers=2)
    assert isinstance(m.policy, ChunkKVPolicy) and m.policy.budget_ratio == 0.3 and m.policy.chunk_size == 10
    assert parse_method("pyramid@0.4", num_layers=4).policy.ratios[0] == 0.4
    with pytest.raises(ValueError, match="takes no budget of its own"):
        parse_method("int4@0.25", num_layers=2)
    with pytest.raises(ValueError, match="calibrates on the evaluated model"):
        parse_method("svd(rank=8)", num_layers=2)
    model = tiny_model()
    p = parse_method("h2o@0.5+svd(rank=4)", model=model).policy
    assert isinstance(p, LowRankPolicy) and p.bases.ranks(0) == (4, 4)
