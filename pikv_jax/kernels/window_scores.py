"""SnapKV window scoring at prefill: why there is no Pallas kernel for it (issue item (d)).

What it computes (cache/policies/scoring.py `window_probs`, used by SnapKV and PyramidKV): the
softmax attention of the last w = 64 prompt queries over the S prompt keys, reduced over the GQA
group and summed over the window. The XLA path never builds an [S, S] matrix: it materialises
f32 logits [B, Hkv, G, w, S], i.e. H * w * S * 4 bytes per row and layer (268 MB at S = 32k,
H = 32), and reads them back a few times (max, exp-sum, normalise, reduce): about 1 GB of traffic,
~0.3 ms on an H100-class GPU.

Why a kernel does not pay:
- Time: the same layer's prefill attention over 32k tokens is ~8.8 TFLOP (causal, 32 heads,
  D = 128), ~15 ms even for a fused flash kernel; the whole layer (with its MLP) is several times
  that. The scoring is ~2% of the layer's attention and well under 1% of prefill, so a fused
  two-pass kernel (row max / sum, then normalised column sums, reading K twice: 2 * S * Hkv * D * 2
  bytes = 128 MB) could save at most that 1%.
- Memory: the 268 MB per row transient is freed after each layer; it only matters at large
  batches, where chunking the rows in XLA bounds it without a kernel.
scripts/bench_kernels.py (section snapkv_scoring) measures both numbers on the device so the
decision can be revisited with data: scoring_fraction_of_fused is the fraction of one layer's
fused causal attention that the scoring takes.
"""

from pikv_jax.cache.policies.scoring import window_probs as reference  # noqa: F401 - the XLA path

__all__ = ["reference"]
