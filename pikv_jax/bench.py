"""Helpers shared by benchmark scripts: memory bandwidth measured in the same run, decode bytes per
step, timing of jitted functions, and JSON output with the machine described."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn(*args)` (outputs blocked on), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def measure_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7) -> dict:
    """Device memory bandwidth in GB/s: `read` (a reduction over nbytes) and `copy` (scale: read + write)."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a))
    copy = jax.jit(lambda a: a * 1.0001)
    t_read = time_fn(read, x, repeats=repeats)
    t_copy = time_fn(copy, x, repeats=repeats)
    return {"read_GBps": nbytes / t_read / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9, "bytes": nbytes}


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
