"""Helpers shared by benchmark scripts: the device and its copy ceiling measured in the same run,
timing of jitted functions, interleaved rounds with their median and min-max range, the goal rule,
and JSON output with the machine described. Imports only jax, numpy and the standard library, so any
layer's benchmark can use it.

The timing protocol (ARCHITECTURE.md section 7): warm-up, then at least `MIN_ROUNDS` interleaved
rounds over all compared configurations (round r times A, then B, then C, ...); every configuration
reports its median and min-max; a ratio is the ratio of medians of the same run, its range is the
min-max of the per-round ratios (the rounds are interleaved, so round r of A and of B saw the same
load); a goal is met only when the whole range is on the right side of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def measure_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7) -> dict:
    """Device memory bandwidth in GB/s: `read` (a reduction over nbytes) and `copy` (scale: read + write),
    in `repeats` interleaved rounds after a warm-up; the GB/s are from the median times, and
    `*_GBps_spread` ({median, min, max}) from the median, slowest and fastest rounds."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a))
    copy = jax.jit(lambda a: a * 1.0001)
    r = interleaved_rounds({"read": lambda: read(x), "copy": lambda: copy(x)}, rounds=repeats)
    out: dict = {"bytes": nbytes, "rounds": repeats}
    for name, moved in (("read", nbytes), ("copy", 2 * nbytes)):
        s = r.stats(name)
        out[f"{name}_GBps"] = moved / s["median"] / 1e9
        out[f"{name}_GBps_spread"] = {"median": out[f"{name}_GBps"], "min": moved / s["max"] / 1e9,
                                      "max": moved / s["min"] / 1e9}
        out[f"{name}_s"] = s
    return out


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


# ---------------------------------------------------------------- interleaved rounds

MIN_ROUNDS = 5  # the protocol's minimum; fewer are allowed (smoke runs) and recorded as such


def spread(values: Sequence[float]) -> dict:
    """{"median", "min", "max", "rounds"} of one configuration's per-round values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread of no values")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": vals}


RANGE_PER_ROUND = "per-round ratios of the interleaved rounds"
RANGE_CONSERVATIVE = "conservative: min(num)/max(den) to max(num)/min(den)"


def ratio_spread(num: Sequence[float], den: Sequence[float], *, paired: bool = True) -> dict:
    """The ratio num/den of two configurations timed in the same run: "median" is the ratio of the
    medians; "min"/"max" the range of the per-round ratios when the rounds are `paired` (interleaved,
    same count), else the conservative range from the extremes. "range_from" says which."""
    a, b = spread(num), spread(den)
    out = {"median": a["median"] / b["median"]}
    if paired and len(a["rounds"]) == len(b["rounds"]):
        per = [x / y for x, y in zip(a["rounds"], b["rounds"])]
        out.update(min=min(per), max=max(per), rounds=per, range_from=RANGE_PER_ROUND)
    else:
        out.update(min=a["min"] / b["max"], max=a["max"] / b["min"], range_from=RANGE_CONSERVATIVE)
    return out


def goal(value: Mapping, *, at_most: float | None = None, at_least: float | None = None, what: str = "") -> dict:
    """The goal rule: `met` only when the whole range [value["min"], value["max"]] is on the right
    side (max <= at_most, min >= at_least). `median_meets` says whether the median alone would,
    so a goal that the noise straddles shows as met=False, median_meets=True."""
    if at_most is None and at_least is None:
        raise ValueError("a goal needs at_most or at_least")
    lo, hi, med = value["min"], value["max"], value["median"]

    def ok(x, y):
        return (at_most is None or x <= at_most) and (at_least is None or y >= at_least)

    return {"goal": what, "at_most": at_most, "at_least": at_least, "median": med, "range": [lo, hi],
            "range_from": value.get("range_from", "min-max of the rounds"),
            "met": bool(ok(hi, lo)), "median_meets": bool(ok(med, med)),
            "rule": "met only when the whole range meets the goal"}


@dataclasses.dataclass
class Rounds:
    """Per-configuration values of interleaved rounds. `order` lists (round, name) in the order the
    calls ran, warm-up rounds numbered -warmup..-1; `warmup` keeps their (discarded) values."""

    names: list[str]
    values: dict[str, list[float]]
    warmup: dict[str, list[float]]
    order: list[tuple[int, str]]

    def stats(self, name: str) -> dict:
        return spread(self.values[name])

    def ratio(self, num: str, den: str) -> dict:
        return ratio_spread(self.values[num], self.values[den], paired=True)

    def to_json(self, scale: float = 1.0) -> dict:
        """{name: spread (values times `scale`) + the warm-up values}, plus the protocol."""
        out = {n: dict(spread([v * scale for v in self.values[n]]), warmup=[v * scale for v in self.warmup[n]])
               for n in self.names}
        return {"configs": out, "protocol": protocol(len(self.values[self.names[0]]),
                                                     len(self.warmup[self.names[0]]))}


def protocol(rounds: int, warmup: int) -> dict:
    return {"rounds": rounds, "warmup_rounds": warmup, "interleaved": True,
            "meets_protocol": rounds >= MIN_ROUNDS and warmup >= 1,
            "stat": "median over rounds; range = min-max; ratios = ratio of medians, range " + RANGE_PER_ROUND}


def interleaved_rounds(configs: Mapping[str, Callable[[], object]], *, rounds: int = MIN_ROUNDS, warmup: int = 1,
                       clock: Callable[[], float] = time.perf_counter, self_timed: bool = False,
                       on_round: Callable[[int, dict], None] | None = None) -> Rounds:
    """Times every configuration in `warmup` untimed-for-the-stats rounds, then `rounds` interleaved
    rounds: round r calls configs[A], configs[B], ... in the mapping's order.

    A value is `clock()` after minus before the call, with its output blocked on; with `self_timed`
    the call returns its own measurement (e.g. ms per decode step from the program's own timer).
    `on_round(r, {name: value})` is called after each timed round (progress lines)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds >= 1 and warmup >= 0 are required, got {rounds}, {warmup}")
    names = list(configs)
    values: dict[str, list[float]] = {n: [] for n in names}
    warm: dict[str, list[float]] = {n: [] for n in names}
    order: list[tuple[int, str]] = []
    for r in range(-warmup, rounds):
        for n in names:
            if self_timed:
                v = float(configs[n]())
            else:
                t0 = clock()
                jax.block_until_ready(configs[n]())
                v = clock() - t0
            order.append((r, n))
            (warm if r < 0 else values)[n].append(v)
        if r >= 0 and on_round is not None:
            on_round(r, {n: values[n][-1] for n in names})
    return Rounds(names=names, values=values, warmup=warm, order=order)


def fmt_spread(s: Mapping, spec: str = ".1f", unit: str = "") -> str:
    """"37.7 (35.1-40.2) ms" from a spread / ratio_spread dict."""
    u = f" {unit}" if unit else ""
    return f"{format(s['median'], spec)} ({format(s['min'], spec)}-{format(s['max'], spec)}){u}"


def memory_maps() -> int:
    """Memory maps this process holds (lines of /proc/self/maps; Linux). Each compiled XLA program
    keeps hundreds, and the kernel's vm.max_map_count (65,530 by default) is a hard ceiling."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS of /proc/self/status; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


# ---------------------------------------------------------------- collectives of a compiled program

COLLECTIVE_OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_DTYPE_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
                     r"|\bbranch_computations=\{([^}]*)\}")


def _shape_bytes(text: str) -> list[int]:
    return [_DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for t, dims in _SHAPE.findall(text)]


def hlo_collectives(hlo: str) -> list[dict]:
    """Every collective instruction (all-reduce, all-gather, all-to-all, collective-permute,
    reduce-scatter; an async `-start` counted once under its op) of an HLO module's text, e.g. a
    compiled program's `as_text()`, as {op, bytes, largest_array, computation, in_loop, line}.

    bytes: of the instruction's result, summed over a tuple's elements (several arrays combined into
    one all-reduce): what an all-reduce, all-to-all or collective-permute exchanges per device, the
    gathered size of an all-gather, the scattered piece of a reduce-scatter. An async start whose
    result pairs input and output (all-gather-start, collective-permute-start) counts its largest array.
    largest_array: bytes of the largest single array of the result (a tuple's biggest element).
    in_loop: the instruction's computation is reached from a while loop's body or condition, so it
    runs once per iteration (for a decode program, once per decode step; once per inner iteration
    for a loop nested in the step)."""
    computation, calls, found = None, {}, []
    loop_roots: set[str] = set()
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            computation = header.group(1)
            calls.setdefault(computation, set())
            continue
        for single, group in _CALLED.findall(line):
            names = [single] if single else [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
            calls.setdefault(computation, set()).update(names)
            if " while(" in line:
                loop_roots.update(names)
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        sizes = _shape_bytes(m.group(1))
        paired = m.group(3) and m.group(2) in ("all-gather", "collective-permute")
        found.append(dict(op=m.group(2), bytes=max(sizes, default=0) if paired else sum(sizes),
                          largest_array=max(sizes, default=0), computation=computation, line=line.strip()[:200]))
    in_loop, todo = set(), list(loop_roots)
    while todo:
        name = todo.pop()
        if name not in in_loop:
            in_loop.add(name)
            todo.extend(calls.get(name, ()))
    for c in found:
        c["in_loop"] = c["computation"] in in_loop
    return found


def collective_summary(found: Sequence[Mapping]) -> dict:
    """{"count", "bytes", "by_op": {op: {"count", "bytes"}}} of `hlo_collectives` entries (pass the
    in-loop ones for the collectives of one decode step)."""
    by_op: dict[str, dict] = {}
    for c in found:
        entry = by_op.setdefault(c["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(c["bytes"])
    return {"count": len(found), "bytes": sum(int(c["bytes"]) for c in found),
            "by_op": dict(sorted(by_op.items()))}


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` to `path` (creating its folder) and says where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
