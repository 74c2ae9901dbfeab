"""`SVDCompressor`: per-layer, per-KV-head SVD bases of post-RoPE keys and of values, fitted on
calibration data; the cache stores rank-r codes and attention runs in the code space
(pikv_jax/compress/lowrank.py holds the cache layout and its policy)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.compress.base import KVCompressor, check_hidden_size
from pikv_jax.compress.lowrank import LowRankBases, LowRankKV, LowRankPolicy, check_rank, encode


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    e = np.asarray(s, np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 1
    cum = np.cumsum(e) / total
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, len(s)))


def fit_bases(layers, *, rank: int | None = None, energy: float | None = None, per_layer_rank: bool = False):
    """Per-layer, per-KV-head SVD bases of keys and values.

    layers: sequence of (k, v, valid) with k, v [B, Hkv, S, D] and valid bool[B, S] (or None).
    The basis of a head is the eigenbasis of its uncentred Gram matrix X^T X (= the right singular
    vectors of X, whose eigenvalues are the squared singular values), so every rank up to D exists
    even with fewer tokens than D. With `energy`, each head's rank is the smallest reaching that
    share; the stored rank is the maximum over heads (and over layers unless per_layer_rank), so
    shapes stay static. Returns (LowRankBases, energies: dict with per-(layer, head) ranks).
    """
    eig = []  # per layer: [(vals_k, vecs_k, vals_v, vecs_v) per head]
    head_dim = None
    for k, v, valid in layers:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"calibration keys/values must be [B, Hkv, S, D] of equal shape, got {k.shape}, {v.shape}")
        head_dim = k.shape[-1]
        mask = np.ones(k.shape[0:1] + k.shape[2:3], bool) if valid is None else np.asarray(valid, bool)
        heads = []
        for h in range(k.shape[1]):
            row = []
            for x in (k[:, h][mask], v[:, h][mask]):
                vals, vecs = np.linalg.eigh(x.T @ x)
                order = np.argsort(vals)[::-1]
                row += [np.clip(vals[order], 0.0, None), vecs[:, order]]
            heads.append(row)
        eig.append(heads)
    if rank is not None:
        check_rank(rank, head_dim)
        rk = rv = [[rank] * len(h) for h in eig]
    else:
        rk = [[energy_rank(np.sqrt(e[0]), energy) for e in heads] for heads in eig]
        rv = [[energy_rank(np.sqrt(e[2]), energy) for e in heads] for heads in eig]
    if per_layer_rank:
        lk, lv = [max(r) for r in rk], [max(r) for r in rv]
    else:
        lk = [max(max(r) for r in rk)] * len(eig)
        lv = [max(max(r) for r in rv)] * len(eig)
    enc_k, dec_k, enc_v, dec_v = [], [], [], []
    for l, heads in enumerate(eig):
        ek = np.stack([e[1][:, : lk[l]] for e in heads])  # [Hkv, D, r]
        ev = np.stack([e[3][:, : lv[l]] for e in heads])
        enc_k.append(ek)
        dec_k.append(np.swapaxes(ek, 1, 2))
        enc_v.append(ev)
        dec_v.append(np.swapaxes(ev, 1, 2))
    return LowRankBases(enc_k, dec_k, enc_v, dec_v), {"head_rank_k": rk, "head_rank_v": rv}


def calibration_layers(source, values=None, *, prompts=None, max_tokens: int = 512):
    """(k, v, valid) per layer from a model (anything with `capture_qkv(prompts, max_tokens=)`, such
    as PiKVModel: its prefill on the calibration text or `prompts`), or from given keys/values: one
    [B, Hkv, S, D] array (one layer) or a sequence per layer."""
    if hasattr(source, "capture_qkv"):
        return [(x.k, x.v, x.valid) for x in source.capture_qkv(prompts, max_tokens=max_tokens)]
    if values is None:
        raise ValueError("calibrate(keys, values): values are missing (or pass a PiKVModel)")
    if hasattr(source, "ndim") and np.ndim(source) == 4:
        source, values = [source], [values]
    if len(source) != len(values):
        raise ValueError(f"{len(source)} layers of keys but {len(values)} of values")
    return [(np.asarray(k), np.asarray(v), None) for k, v in zip(source, values)]


class SVDCompressor(KVCompressor):
    """Per-KV-head SVD bases: the cache stores rank-r codes and attention runs in the code space.

    rank: fixed rank r (1 <= r <= head dim); energy_threshold: in (0, 1], the smallest rank whose
    squared singular values reach that share (default 0.9 when neither is given); the stored rank
    is the maximum over heads and layers (per layer with per_layer_rank=True). code_dtype: storage
    of the codes (default: the cache / input dtype). `calibrate(model)` fits one basis per layer and
    head from the model's post-RoPE keys and values on calibration text; a standalone call on an
    uncalibrated compressor fits the basis on the given data (and stores it with the codes).
    hidden_size (optional): the per-token width K/V must have; an uncalibrated SVD built with it
    compresses each token's concatenated heads (rank <= hidden_size), a calibrated one stores its
    bases' KV heads (standalone calls regroup keys into them, see pikv_jax/compress/base.py).
    """

    name = "svd"

    def __init__(self, rank: int | None = None, energy_threshold: float | None = None, *,
                 hidden_size: int | None = None, per_layer_rank: bool = False, code_dtype=None):
        super().__init__()
        self.hidden_size = check_hidden_size(hidden_size)
        if rank is not None and energy_threshold is not None:
            raise ValueError("give either rank or energy_threshold, not both")
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
                raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
            if hidden_size is not None:
                check_rank(int(rank), hidden_size)
        elif energy_threshold is None:
            energy_threshold = 0.9
        if energy_threshold is not None and not 0.0 < float(energy_threshold) <= 1.0:
            raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold}")
        self.rank = None if rank is None else int(rank)
        self.energy_threshold = None if energy_threshold is None else float(energy_threshold)
        self.per_layer_rank = per_layer_rank
        self.code_dtype = code_dtype
        self.bases: LowRankBases | None = None
        self.head_ranks: dict | None = None

    def calibrate(self, source, values=None, *, prompts=None, max_tokens: int = 512) -> "SVDCompressor":
        """Fits per-layer bases from a PiKVModel (calibration text or `prompts`) or from keys/values."""
        layers = calibration_layers(source, values, prompts=prompts, max_tokens=max_tokens)
        self.bases, self.head_ranks = fit_bases(layers, rank=self.rank, energy=self.energy_threshold,
                                                per_layer_rank=self.per_layer_rank)
        return self

    @property
    def calibrated(self) -> bool:
        return self.bases is not None

    def stored_layout(self, importance=None):
        if self.bases is not None:
            return self.bases.num_kv_heads, self.bases.head_dim
        return None if self.hidden_size is None else (1, self.hidden_size)

    def compress(self, keys, values, importance=None, *, layer: int | None = None) -> LowRankKV:
        """Codes of keys/values [B, Hkv, S, D] in the calibrated basis of `layer` (when calibrated
        and a layer is given) or in a basis fitted on this data."""
        if self.rank is not None:
            check_rank(self.rank, keys.shape[-1])
        if self.bases is not None and layer is not None:
            bases = self.bases
        else:
            bases, _ = fit_bases([(keys, values, None)], rank=self.rank, energy=self.energy_threshold)
            layer = 0
        ek, dk, ev, dv = (jnp.asarray(x) for x in bases.layer(layer))
        if ek.shape[:2] != (keys.shape[1], keys.shape[-1]):
            raise ValueError(f"bases are for Hkv={ek.shape[0]}, D={ek.shape[1]}; got keys {tuple(keys.shape)}")
        dtype = self.code_dtype if self.code_dtype is not None else keys.dtype
        return LowRankKV(ck=encode(keys, ek).astype(dtype), cv=encode(values, ev).astype(dtype), dec_k=dk, dec_v=dv)

    def as_policy(self, inner=None) -> LowRankPolicy:
        if self.bases is None:
            raise ValueError("SVDCompressor.as_policy needs per-layer bases: call calibrate(model) first")
        return LowRankPolicy(inner=inner if inner is not None else CachePolicy(), bases=self.bases,
                             code_dtype=self.code_dtype, method="svd")
