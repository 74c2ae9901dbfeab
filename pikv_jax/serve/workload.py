"""Serving workloads and their replay: Poisson arrivals with prompt and output lengths drawn from
uniform ranges under a fixed seed, replayed against the engine (continuous batching) or against
`PiKVModel.generate` with static batches (the baseline a serving engine must beat).

Every request generates exactly its drawn number of tokens (no stop ids), so every method does the
same work and tokens/s compare.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.serve.engine import Engine, Request
from pikv_jax.serve.metrics import latency_summary


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """n_requests arriving as a Poisson process of `rate` requests/s (inf = all at t=0), prompt
    lengths uniform in [prompt_min, prompt_max], output lengths uniform in [output_min, output_max]."""

    n_requests: int = 16
    rate: float = float("inf")
    prompt_min: int = 1024
    prompt_max: int = 2048
    output_min: int = 32
    output_max: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("n_requests", "prompt_min", "output_min"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.prompt_max < self.prompt_min:
            raise ValueError(f"prompt_max ({self.prompt_max}) must be >= prompt_min ({self.prompt_min})")
        if self.output_max < self.output_min:
            raise ValueError(f"output_max ({self.output_max}) must be >= output_min ({self.output_min})")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (inf = all at once), got {self.rate!r}")


@dataclasses.dataclass(frozen=True)
class TimedRequest:
    at: float  # seconds after the replay starts
    request: Request


def make_workload(spec: WorkloadSpec, source: Sequence[int]) -> list[TimedRequest]:
    """Requests whose prompts are windows of `source` (a long token sequence, e.g. a tokenized
    text) at seeded offsets; deterministic for a given spec and source."""
    if len(source) < spec.prompt_max:
        raise ValueError(f"the token source has {len(source)} tokens, fewer than prompt_max={spec.prompt_max}")
    rng = np.random.default_rng(spec.seed)
    gaps = (np.zeros(spec.n_requests) if spec.rate == float("inf")
            else rng.exponential(1.0 / spec.rate, spec.n_requests))
    at = np.cumsum(gaps) - gaps[0]
    out = []
    for i in range(spec.n_requests):
        n = int(rng.integers(spec.prompt_min, spec.prompt_max + 1))
        start = int(rng.integers(0, len(source) - n + 1))
        m = int(rng.integers(spec.output_min, spec.output_max + 1))
        out.append(TimedRequest(at=float(at[i]), request=Request(prompt=list(source[start: start + n]),
                                                                 max_new_tokens=m, stop_ids=())))
    return out


def replay_engine(engine: Engine, workload: Sequence[TimedRequest], *, timeout: float = 3600.0,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Submits each request at its arrival time to the engine (running in its background thread)
    and waits for all; returns the engine's metrics for this replay and per-request records."""
    engine.metrics.reset()
    engine.start()
    t0 = time.perf_counter()
    handles = []
    for tr in workload:
        delay = t0 + tr.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append(engine.submit(tr.request))
    t_end = time.perf_counter() + timeout
    for h in handles:
        while not h.wait(1.0):
            if time.perf_counter() > t_end:
                raise TimeoutError(f"replay still running after {timeout} s")
            if progress:
                progress(engine.metrics.progress_line(busy=engine.busy_slots, queued=engine.queue_length))
    wall = max(h.finished_at for h in handles) - t0
    stats = engine.stats()
    tokens = sum(len(h.tokens) for h in handles)
    stats.update(wall_s=wall, output_tokens=tokens, output_tokens_per_s=tokens / wall,
                 requests_per_s=len(handles) / wall)
    return dict(stats=stats, requests=[dict(id=h.id, prompt_tokens=len(h.request.prompt), tokens=h.tokens,
                                            finish_reason=h.finish_reason,
                                            ttft_s=h.token_times[0] - h.submitted if h.token_times else None)
                                       for h in handles])


def replay_static(model, policy: CachePolicy | None, workload: Sequence[TimedRequest], batch_size: int) -> dict:
    """The same workload through `generate` in static batches of `batch_size` in arrival order: a
    batch starts when its last request has arrived and the previous batch is done, and runs until
    its longest request finishes. TTFT = batch start + its prefill (generate's own timer) - arrival;
    inter-token latency = the batch's decode time per step."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clock = 0.0
    ttft, itl, tokens, records = [], [], 0, []
    t_start = time.perf_counter()
    for s in range(0, len(workload), batch_size):
        batch = workload[s: s + batch_size]
        clock = max(clock, max(tr.at for tr in batch))
        wait = t_start + clock - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        n = max(tr.request.max_new_tokens for tr in batch)
        out = model.generate([list(tr.request.prompt) for tr in batch], n, policy=policy, stop_ids=())
        clock = time.perf_counter() - t_start
        st = out.stats
        for tr, ids in zip(batch, out.token_ids):
            own = ids[: tr.request.max_new_tokens]
            tokens += len(own)
            ttft.append(t0 - t_start + st["prefill_s"] - tr.at)
            records.append(dict(prompt_tokens=len(tr.request.prompt), tokens=own))
        if st["decode_steps"]:
            itl.append(st["decode_s"] / st["decode_steps"])
    wall = clock
    return dict(stats=dict(wall_s=wall, output_tokens=tokens, output_tokens_per_s=tokens / wall,
                           requests_per_s=len(workload) / wall, ttft_ms=latency_summary(ttft),
                           itl_ms=latency_summary(itl), batch_size=batch_size), requests=records)


__all__ = ["TimedRequest", "WorkloadSpec", "make_workload", "replay_engine", "replay_static"]
