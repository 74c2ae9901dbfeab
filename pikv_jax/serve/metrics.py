"""What a serving user watches, measured by the engine itself: throughput, latency, slots, memory.

Latency percentiles are over the most recent `EngineMetrics.WINDOW` samples of each kind (counters
cover the whole run). Latencies come from the host times at which tokens reach each request (`RequestHandle`): time to
first token (submit to first token), inter-token latency (a request's mean gap between tokens
after the first: (last - first) / (n - 1)), and the delivery gap (time between two host visits
that hand a request tokens; one visit delivers up to `steps_per_visit` tokens at once).
"""

from __future__ import annotations

import collections
import time
from collections import deque

import numpy as np


def latency_summary(values, scale: float = 1000.0) -> dict:
    """median / p99 / max (x scale, ms by default) of a list, NaN when empty."""
    values = list(values)
    if not values:
        return dict(median=float("nan"), p99=float("nan"), max=float("nan"), n=0)
    a = np.asarray(values, np.float64) * scale
    return dict(median=float(np.median(a)), p99=float(np.percentile(a, 99)), max=float(a.max()), n=int(a.size))


class EngineMetrics:
    """Counters and latency samples, updated by the engine thread; `snapshot()` reads them."""

    WINDOW = 4096  # latency samples kept (the most recent), so a long-lived server stays bounded

    def __init__(self, *, num_slots: int, slot_bytes: int, cache_bytes_allocated: int):
        self.num_slots, self.slot_bytes, self.cache_bytes_allocated = num_slots, slot_bytes, cache_bytes_allocated
        self.reset()

    def reset(self) -> None:
        self.started: float | None = None
        self.last_event: float | None = None
        self.requests_submitted = self.requests_finished = 0
        self.prompt_tokens = self.output_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.visits = 0
        self.busy_slot_seconds = 0.0
        self.max_queue = 0
        self.evicted_tokens = 0.0
        self.finish_reasons: collections.Counter = collections.Counter()
        self.ttft: deque[float] = deque(maxlen=self.WINDOW)
        self.itl: deque[float] = deque(maxlen=self.WINDOW)
        self.delivery_gap: deque[float] = deque(maxlen=self.WINDOW)

    def _touch(self) -> float:
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        self.last_event = now
        return now

    def submitted(self, queued: int) -> None:
        self._touch()
        self.requests_submitted += 1
        self.max_queue = max(self.max_queue, queued)

    def admitted(self, prefill_s: float, prompt_tokens: int) -> None:
        self._touch()
        self.prefill_s += prefill_s
        self.prompt_tokens += prompt_tokens

    def visit(self, decode_s: float, emitted: int, busy: int, queued: int) -> None:
        self._touch()
        self.visits += 1
        self.decode_s += decode_s
        self.busy_slot_seconds += busy * decode_s
        self.max_queue = max(self.max_queue, queued)

    def finished(self, handle) -> None:
        self._touch()
        self.requests_finished += 1
        self.finish_reasons[handle.finish_reason] += 1
        self.output_tokens += len(handle.tokens)
        self.evicted_tokens += handle.evicted_tokens
        t = handle.token_times
        if t:
            self.ttft.append(t[0] - handle.submitted)
        if len(t) > 1:
            self.itl.append((t[-1] - t[0]) / (len(t) - 1))
            self.delivery_gap.extend(b - a for a, b in zip(t, t[1:]) if b > a)

    def snapshot(self, *, busy: int, queued: int) -> dict:
        elapsed = (self.last_event - self.started) if self.started is not None else 0.0
        rate = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: float("nan"))
        return dict(
            elapsed_s=elapsed, requests_submitted=self.requests_submitted, requests_finished=self.requests_finished,
            requests_per_s=rate(self.requests_finished), output_tokens=self.output_tokens,
            output_tokens_per_s=rate(self.output_tokens), prompt_tokens=self.prompt_tokens,
            prefill_tokens_per_s=self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan"),
            ttft_ms=latency_summary(self.ttft), itl_ms=latency_summary(self.itl),
            delivery_gap_ms=latency_summary(self.delivery_gap),
            slots=self.num_slots, slots_busy=busy,
            slots_busy_mean=self.busy_slot_seconds / self.decode_s if self.decode_s else 0.0,
            queue_length=queued, queue_max=self.max_queue,
            cache_bytes_allocated=self.cache_bytes_allocated, cache_bytes_in_use=busy * self.slot_bytes,
            slot_bytes=self.slot_bytes, evicted_tokens=self.evicted_tokens,
            finish_reasons=dict(self.finish_reasons), visits=self.visits)

    def progress_line(self, *, busy: int, queued: int) -> str:
        s = self.snapshot(busy=busy, queued=queued)
        return (f"{s['requests_finished']}/{s['requests_submitted']} done  {s['output_tokens_per_s']:.1f} tok/s  "
                f"ttft p50 {s['ttft_ms']['median']:.0f} ms  itl p50 {s['itl_ms']['median']:.0f} ms  "
                f"slots {busy}/{self.num_slots}  queue {queued}")
