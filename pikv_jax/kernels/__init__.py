"""Pallas kernels for the hot paths, each beside its pure-jnp reference, behind one switch.

- decode_attention.py: decode attention over a slot-ordered cache returning the per-slot mass
  (split-K flash decoding on GPU / Triton, all KV heads per program on TPU / Mosaic); also the
  page-table variant used by Quest.
- quantized_attention.py: the same over a KIVI cache, dequantization fused into the block loads,
  the full-precision ring merged by log-sum-exp.
- quest.py: Quest page upper bounds + top-k page selection; TPU attention over selected pages.
- quant_pack.py: KIVI quantize-and-pack of new tokens (bit-identical to kernels/quant.py).
- window_scores.py: SnapKV window scoring; no kernel (it does not pay), the docstring says why.
- common.py: impl = "xla" | "pallas" | "auto" (`set_attention_impl`, $PIKV_ATTENTION_IMPL),
  backend / interpret selection, jax-version shims, logged fallbacks.

Generation reaches them only through pikv_jax/attention/dispatch.py.
"""

from pikv_jax.kernels.common import KernelUnsupported, get_attention_impl, resolve_impl, set_attention_impl

__all__ = ["KernelUnsupported", "get_attention_impl", "resolve_impl", "set_attention_impl"]
