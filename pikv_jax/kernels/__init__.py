"""Pallas kernels for the hot paths, each beside its pure-jnp reference, both on raw arrays, behind
one switch. Kernels import only jax, pikv_jax.attention.reference and each other.

- decode_attention.py: decode attention over a slot-ordered cache returning the per-slot mass
  (split-K flash decoding on GPU / Triton, all KV heads per program on TPU / Mosaic); also the
  page-table variant used by Quest.
- quantized_attention.py: the same over a KIVI cache's arrays, dequantization fused into the block
  loads, the full-precision ring merged by log-sum-exp.
- quest.py: Quest page upper bounds + top-k page selection; TPU attention over selected pages.
- quant_pack.py: KIVI quantize-and-pack of new tokens (bit-identical to quant.py, its reference).
- quant.py: the KIVI quantization primitives (plain jnp).
- common.py: impl = "xla" | "pallas" | "auto" (`set_attention_impl`, $PIKV_ATTENTION_IMPL),
  backend / interpret selection, jax-version shims, logged fallbacks, and the online softmax the
  decode kernels share.

No kernel for SnapKV window scoring at prefill (cache/policies/scoring.py `window_probs`): the XLA
path already avoids an [S, S] matrix (f32 logits [B, Hkv, G, w, S], 268 MB per row and layer at
S = 32k, H = 32, w = 64; about 1 GB of traffic, ~0.3 ms on an H100-class GPU), while the same
layer's prefill attention is ~8.8 TFLOP (~15 ms even fused). Scoring is ~2% of the layer's
attention and under 1% of prefill, so a fused two-pass kernel could save at most that; the
transient memory is freed per layer and bounded by chunking rows in XLA. scripts/bench_kernels.py
(section snapkv_scoring) measures both on a device so the decision can be revisited with data.

Generation reaches the kernels only through pikv_jax/attention/dispatch.py.
"""

from pikv_jax.kernels.common import KernelUnsupported, get_attention_impl, resolve_impl, set_attention_impl

__all__ = ["KernelUnsupported", "get_attention_impl", "resolve_impl", "set_attention_impl"]
