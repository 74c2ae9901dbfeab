"""KV-cache compression: KIVI quantization, low rank (SVD, LoRA), FastV, ChunkKV, pyramid budgets and
PiKVCompressor. Every compressor has the seed's standalone call `compressor(keys, values,
importance=None)` returning a real, smaller pytree, and `as_policy(inner)` for generation."""

from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.compress.base import CompressedKV, CompressionStats, KVCompressor
from pikv_jax.compress.chunkkv import ChunkKVCompressor, ChunkKVPolicy
from pikv_jax.compress.factory import CompressorChain, compressor_from_spec, create_compressor, parse_compress_spec
from pikv_jax.compress.fastv import FastVCompressor, FastVPolicy
from pikv_jax.compress.kivi import QuantizedPolicy
from pikv_jax.compress.lora import LoRACompressor
from pikv_jax.compress.lowrank import LowRankBases, LowRankKV, LowRankLayerCache, LowRankPolicy
from pikv_jax.compress.pikv import PerLayerPolicy, PiKVCompressor
from pikv_jax.compress.pyramid import PyramidCompressor, PyramidPolicy
from pikv_jax.compress.quantized import QuantizedCompressor, QuantizedKV
from pikv_jax.compress.selection import SelectedKV, SelectorPolicy
from pikv_jax.compress.svd import SVDCompressor

__all__ = ["ChunkKVCompressor", "ChunkKVPolicy", "CompressedKV", "CompressionStats", "CompressorChain",
           "FastVCompressor", "FastVPolicy", "KVCompressor", "LoRACompressor", "LowRankBases", "LowRankKV",
           "LowRankLayerCache", "LowRankPolicy", "PerLayerPolicy", "PiKVCompressor", "PyramidCompressor",
           "PyramidPolicy", "QuantizedCompressor", "QuantizedKV", "QuantizedLayerCache", "QuantizedPolicy",
           "SVDCompressor", "SelectedKV", "SelectorPolicy", "compressor_from_spec", "create_compressor",
           "parse_compress_spec"]
