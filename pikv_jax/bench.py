"""Helpers shared by benchmark scripts: the device and its copy ceiling measured in the same run,
timing of jitted functions, and JSON output with the machine described. Imports only jax, numpy
and the standard library, so any layer's benchmark can use it."""

from __future__ import annotations

import json
import os
import platform
import re
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


def timed(fn, *args, iters: int = 10, repeats: int = 5) -> float:
    """Median over `repeats` of the mean seconds of `iters` back-to-back calls (compiled, warm):
    async dispatch keeps the device busy, so short kernels are not dominated by launch latency."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters)
    return float(np.median(ts))


def card_name() -> str:
    """Short lower-case name of the first device for file names: "h100", "h200", "tpuv5e", ..."""
    kind = jax.devices()[0].device_kind.lower()
    m = re.search(r"(h100|h200|h800|a100|a10g|l40s|l4|b200|gb200|v100|tpu v\w+)", kind)
    return re.sub(r"[^a-z0-9]+", "", m.group(1) if m else kind) or "unknown"


def copy_ceiling(nbytes: int) -> dict:
    """The copy ceiling of ARCHITECTURE.md section 5, in GB/s: a jitted bf16 scale (read + write)
    and a bf16 sum (read) over `nbytes`."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    scale = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t_copy, t_read = timed(scale, x), timed(read, x)
    del x
    return {"copy_GBps": 2 * nbytes / t_copy / 1e9, "read_GBps": nbytes / t_read / 1e9, "bytes": nbytes,
            "how": "jitted bf16 x * 1.0001 (read + write) and a bf16 sum (read)"}


def device_and_ceiling(quick: bool) -> tuple[str, dict]:
    """Prints the device and its copy ceiling (over 64 MiB when `quick`, else 2 GiB: beyond the
    caches) measured now -> (card_name(), copy_ceiling(...)). Kernels are judged against it."""
    card = card_name()
    print(f"device: {jax.devices()[0].device_kind} ({card}), jax {jax.__version__}, platform {jax.default_backend()}")
    bw = copy_ceiling((64 if quick else 2048) * 2**20)
    print(f"copy ceiling {bw['copy_GBps']:.0f} GB/s (read {bw['read_GBps']:.0f} GB/s)")
    return card, bw


def machine_info() -> dict:
    """Platform, CPUs, jax backend and devices, for the JSON of a run."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` to `path` (creating its folder) and says where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
