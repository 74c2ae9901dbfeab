"""DuoAttention head patterns: which KV heads are retrieval heads (full cache) and which are
streaming heads (sinks + recent window), and the pattern JSON file that stores them. Patterns come
from `pikv_jax.calibrate.duo` (attention statistics) or `pikv_jax.train.duo` (learned gates).

Pattern file (JSON, one object):

    {
      "format": "pikv-duo-pattern",       # fixed
      "version": 1,
      "method": "attention_statistics",   # or "distillation" (learned gates, later issue)
      "num_layers": L, "num_kv_heads": Hkv,
      "retrieval_heads": [[true, false, ...], ...],   # L lists of Hkv booleans, true = retrieval
      "scores": [[0.41, 0.02, ...], ...] or null,     # L x Hkv floats the pattern was binarised
                                                      # from (long-range share, or gate alpha)
      "n_sink": 64, "window": 256,        # streaming-head cache the scores refer to
      "retrieval_fraction": 0.5 or null,  # how scores were binarised: a quantile ...
      "threshold": null or 0.5,           # ... or a threshold (exactly one is non-null when
                                          #     scores come from this module)
      "metadata": {...}                   # free-form: model, prompts, lengths, seed, ...
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np

FORMAT = "pikv-duo-pattern"
VERSION = 1


# --------------------------------------------------------------------------- the pattern file


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """A DuoAttention head pattern and how it was obtained (the content of the JSON file).

    retrieval: per layer, per KV head, True = retrieval head. scores: optional per-head floats
    (higher = more retrieval-like). n_sink / window: the streaming cache the pattern was made
    for. method, retrieval_fraction, threshold, metadata: provenance (see module docstring).
    """

    retrieval: tuple[tuple[bool, ...], ...]
    n_sink: int
    window: int
    scores: tuple[tuple[float, ...], ...] | None = None
    method: str = "attention_statistics"
    retrieval_fraction: float | None = None
    threshold: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pattern(self) -> tuple[tuple[bool, ...], ...]:
        return self.retrieval

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "method": self.method,
            "num_layers": len(self.retrieval), "num_kv_heads": len(self.retrieval[0]),
            "retrieval_heads": [list(r) for r in self.retrieval],
            "scores": None if self.scores is None else [list(map(float, r)) for r in self.scores],
            "n_sink": int(self.n_sink), "window": int(self.window),
            "retrieval_fraction": self.retrieval_fraction, "threshold": self.threshold,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: dict) -> "HeadPattern":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a DuoAttention pattern: expected \"format\": \"{FORMAT}\"")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported pattern version {data.get('version')!r}; allowed: {VERSION}")
        heads = data.get("retrieval_heads")
        if not heads or not all(isinstance(r, list) and r and all(isinstance(x, bool) for x in r) for r in heads):
            raise ValueError("retrieval_heads must be a non-empty list of non-empty lists of booleans")
        if len({len(r) for r in heads}) != 1:
            raise ValueError("retrieval_heads rows must all have num_kv_heads entries")
        if data.get("num_layers", len(heads)) != len(heads) or data.get("num_kv_heads", len(heads[0])) != len(heads[0]):
            raise ValueError(f"num_layers / num_kv_heads ({data.get('num_layers')}, {data.get('num_kv_heads')}) do "
                             f"not match retrieval_heads ({len(heads)} x {len(heads[0])})")
        scores = data.get("scores")
        if scores is not None and (len(scores) != len(heads) or any(len(s) != len(heads[0]) for s in scores)):
            raise ValueError("scores must have the shape of retrieval_heads")
        return cls(retrieval=tuple(tuple(r) for r in heads), n_sink=int(data["n_sink"]), window=int(data["window"]),
                   scores=None if scores is None else tuple(tuple(float(x) for x in r) for r in scores),
                   method=str(data.get("method", "attention_statistics")),
                   retrieval_fraction=data.get("retrieval_fraction"), threshold=data.get("threshold"),
                   metadata=dict(data.get("metadata") or {}))


def save_pattern(path, pattern: HeadPattern) -> None:
    """Writes the pattern JSON (see module docstring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(pattern.to_json().items())
    lines = []
    for i, (key, val) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if key in ("retrieval_heads", "scores") and val is not None:  # one layer per line
            rows = ",\n".join("  " + json.dumps(r) for r in val)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ]{end}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(val)}{end}")
    path.write_text("{\n" + "\n".join(lines) + "\n}\n")


def load_pattern(path) -> HeadPattern:
    with open(path) as f:
        return HeadPattern.from_json(json.load(f))


def binarize(scores, *, retrieval_fraction: float | None = None, threshold: float | None = None):
    """Retrieval heads from per-head scores f32[L, Hkv] (higher = retrieval) -> tuple of tuples of bools.

    retrieval_fraction in [0, 1]: the top round(fraction * L * Hkv) heads over all layers (ties:
    lower layer, then lower head first). threshold: heads with score >= threshold. Give exactly one.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [num_layers, num_kv_heads] array, got shape {scores.shape}")
    if (retrieval_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of retrieval_fraction (share of heads kept as retrieval heads) or threshold")
    if threshold is not None:
        mask = scores >= threshold
    else:
        if not 0.0 <= retrieval_fraction <= 1.0:
            raise ValueError(f"retrieval_fraction must be in [0, 1], got {retrieval_fraction}")
        n = int(math.floor(retrieval_fraction * scores.size + 0.5))
        order = np.argsort(-scores.reshape(-1), kind="stable")
        mask = np.zeros(scores.size, bool)
        mask[order[:n]] = True
        mask = mask.reshape(scores.shape)
    return tuple(tuple(bool(x) for x in row) for row in mask)


# --------------------------------------------------------------------------- attention statistics


__all__ = ["FORMAT", "HeadPattern", "VERSION", "binarize", "load_pattern", "save_pattern"]
