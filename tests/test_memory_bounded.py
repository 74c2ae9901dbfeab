"""A long-lived `PiKVModel` keeps its memory flat: dropped compiled programs are released.

200 `generate` calls with varied prompt lengths, batch sizes and policies run in a subprocess (so
no other test's compiled programs or caches are counted), with a small LRU of compiled programs,
so programs keep being compiled and dropped. After a warm-up, the process's memory maps
(/proc/self/maps lines) and RSS (VmRSS) must stay flat. Before the fix each dropped program kept
~300 maps and ~10 MB of this tiny model (~1,300 maps and ~140 MB for SmolLM2) alive in jax's
caches, so the process grew by thousands of maps here and crashed on real models.

Run `python tests/test_memory_bounded.py [calls]` to print the per-call measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pikv_jax.api import PiKVModel
from pikv_jax.bench import memory_maps, rss_mb
from pikv_jax.cache.policies import make_policy
from pikv_jax.config import tiny_config

CALLS = 200
BLOCK = 5  # calls per (policy, length bucket, batch) block: traffic that changes program now and then
WARMUP = 50  # calls before the flatness window
MAX_COMPILED = 6  # of 24 possible programs: most blocks compile one and drop the oldest
MAPS_TOLERANCE = 150  # measured growth over calls 50..200 after the fix: 39 maps (before: 2,371)
RSS_TOLERANCE_MB = 60.0  # measured growth after the fix: 23 MB (before: 98 MB)
BUCKETS = [(1, 64), (65, 128), (129, 192), (193, 256)]  # prompt-length ranges of one padded width


def run_workload(calls: int = CALLS, seed: int = 0) -> dict:
    """The workload, run in this process; returns per-call maps, RSS (MB) and compile flags."""
    model = PiKVModel.from_config(tiny_config(num_hidden_layers=1, vocab_size=64, hidden_size=32,
                                              intermediate_size=32))
    model.MAX_COMPILED = MAX_COMPILED
    policies = [None, make_policy("h2o", budget_ratio=0.5), make_policy("streaming_llm", budget_tokens=24, window=8)]
    rng = np.random.default_rng(seed)
    maps, rss, compiled = [], [], []
    t0 = time.perf_counter()
    for i in range(calls):
        if i % BLOCK == 0:
            policy = policies[rng.integers(len(policies))]
            lo, hi = BUCKETS[rng.integers(len(BUCKETS))]
            batch = int(rng.integers(1, 3))
        prompts = [rng.integers(3, 64, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(batch)]
        out = model.generate(prompts, max_new_tokens=4, policy=policy, seed=i)
        assert all(1 <= len(t) <= 4 for t in out.token_ids)
        compiled.append(out.stats["compile_s"] > 0)
        maps.append(memory_maps())
        rss.append(rss_mb())
    return dict(maps=maps, rss_mb=rss, compiled=compiled, seconds=time.perf_counter() - t0)


def workload_in_subprocess(calls: int = CALLS) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(calls)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=1200)  # a hang guard, with room for a loaded machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_memory_stays_flat_over_200_generate_calls():
    r = workload_in_subprocess()
    maps, rss = r["maps"], r["rss_mb"]
    late_compiles = sum(r["compiled"][WARMUP:])
    assert late_compiles >= 10, f"only {late_compiles} programs compiled after warm-up: nothing was dropped"
    maps_growth = max(maps[WARMUP:]) - maps[WARMUP - 1]
    rss_growth = max(rss[WARMUP:]) - rss[WARMUP - 1]
    detail = (f"maps {maps[0]} -> {maps[WARMUP - 1]} (call {WARMUP}) -> {maps[-1]}, max {max(maps)}; "
              f"RSS {rss[0]:.0f} -> {rss[WARMUP - 1]:.0f} -> {rss[-1]:.0f} MB; "
              f"{sum(r['compiled'])} programs compiled, {late_compiles} after warm-up")
    assert maps_growth <= MAPS_TOLERANCE, detail
    assert rss_growth <= RSS_TOLERANCE_MB, detail


if __name__ == "__main__":
    result = run_workload(int(sys.argv[1]) if len(sys.argv) > 1 else CALLS)
    print(json.dumps(result))
