"""Replaying a workload against a running `pikv serve` over HTTP (streaming /v1/completions).

Each request is sent at its arrival time (bounded to `concurrency` in flight) with its token ids as
the prompt, greedy, `ignore_eos` so it produces exactly its max_tokens; latencies are measured by
the client from the server-sent chunks: time to first token, and inter-token latency (a request's
mean gap between tokens after the first).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Sequence

import httpx

from pikv_jax.serve.metrics import latency_summary
from pikv_jax.serve.workload import TimedRequest


async def _one(client: httpx.AsyncClient, url: str, tr: TimedRequest, t0: float, gate: asyncio.Semaphore,
               model: str) -> dict:
    delay = t0 + tr.at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with gate:
        sent = time.perf_counter()
        body = dict(model=model, prompt=list(tr.request.prompt), max_tokens=tr.request.max_new_tokens,
                    temperature=0.0, stream=True, ignore_eos=True)
        ids: list[int] = []
        times: list[float] = []
        async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return dict(error=f"HTTP {r.status_code}: {text[:200]}", ids=[], times=[], sent=sent)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                new = json.loads(payload)["choices"][0].get("token_ids") or []
                now = time.perf_counter()
                ids += new
                times += [now] * len(new)
        return dict(ids=ids, times=times, sent=sent, error=None)


async def _replay(url: str, workload: Sequence[TimedRequest], concurrency: int, model: str, timeout: float):
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, tr, t0, gate, model) for tr in workload))
    return t0, results


def replay_http(url: str, workload: Sequence[TimedRequest], *, concurrency: int = 16, model: str = "pikv",
                timeout: float = 3600.0) -> dict:
    """Client-side metrics of the workload against the server at `url` (e.g. http://127.0.0.1:8000)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    t0, results = asyncio.run(_replay(url, workload, concurrency, model, timeout))
    errors = [r["error"] for r in results if r["error"]]
    done = [r for r in results if not r["error"] and r["times"]]
    wall = max((r["times"][-1] for r in done), default=time.perf_counter()) - t0
    tokens = sum(len(r["ids"]) for r in done)
    ttft = [r["times"][0] - r["sent"] for r in done]
    itl = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in done if len(r["times"]) > 1]
    stats = dict(wall_s=wall, requests=len(results), requests_ok=len(done), errors=errors[:5], n_errors=len(errors),
                 output_tokens=tokens, output_tokens_per_s=tokens / wall if wall > 0 else float("nan"),
                 requests_per_s=len(done) / wall if wall > 0 else float("nan"),
                 ttft_ms=latency_summary(ttft), itl_ms=latency_summary(itl), concurrency=concurrency)
    return dict(stats=stats, requests=[dict(prompt_tokens=len(tr.request.prompt), tokens=r["ids"], error=r["error"])
                                       for tr, r in zip(workload, results)])


__all__ = ["replay_http"]
