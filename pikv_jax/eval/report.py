"""Evaluation output: one JSON file, a PNG of passkey and RULER accuracy against kept bytes per
method, and markdown tables for the README.

Kept bytes are what the kept tokens of one sequence take in a bf16 K+V cache (or what a compressed
cache reports), so eviction and quantization share one axis.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from pikv_jax.eval.passkey import summarize

MiB = 2.0**20


def split_label(label: str) -> tuple[str, str]:
    """"h2o@0.25" -> ("h2o", "0.25"); "full" -> ("full", "")."""
    base, _, budget = label.rpartition("@")
    return (base, budget) if base else (label, "")


def budget_text(budget: str) -> str:
    if not budget:
        return "100%"
    if budget.endswith("t"):
        return f"{budget[:-1]} tok"
    try:
        return f"{100 * float(budget):g}%"
    except ValueError:
        return budget


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(payload), f, indent=1)
    return path


def _plot_panel(ax, rows: Sequence[dict], mode: str, bases: Sequence[str], ylabel: str) -> None:
    """One mode's accuracy against allocated cache bytes: a line per method base through its
    budgets, the full cache as a star with a dotted level."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    markers = "osD^vP<>Xh"
    for i, base in enumerate(bases):
        pts = sorted(((r["cache_bytes"] / MiB, r["accuracy"], split_label(r["method"])[1]) for r in rows
                      if r["mode"] == mode and split_label(r["method"])[0] == base))
        if not pts:
            continue
        x, y, b = zip(*pts)
        if base == "full":
            ax.scatter(x, y, marker="*", s=220, color="black", zorder=5, label="full")
            ax.axhline(np.mean(y), color="black", lw=0.8, ls=":")
        else:
            ax.plot(x, y, marker=markers[i % len(markers)], color=cmap(i % 20), alpha=0.8, ms=7,
                    ls="-" if i < 10 else "--", label=base)
            for xi, yi, bi in zip(x, y, b):
                ax.annotate(budget_text(bi), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("KV cache bytes allocated per sequence (MiB, as stored)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(mode.replace("_", "-"))


def plot_accuracy_vs_bytes(summary: Sequence[dict], path: str, *, context: int | None = None,
                           title: str | None = None, ruler: Sequence[dict] = ()) -> str | None:
    """One panel per mode: accuracy (y) against the KV cache bytes allocated per sequence, as stored
    (x: codes, scales and residual for quantized caches, the cache dtype otherwise), so eviction and
    quantization share one axis; one line per method through its budgets, the full cache as a star.
    `summary` holds passkey rows, `ruler` RULER rows per (method, mode, context) (accuracy = mean
    string-match-all over the tasks); each gets a row of panels. Returns the path (None without rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [(name, [r for r in rs if context is None or r["context"] == context])
                for name, rs in (("passkey accuracy", summary), ("RULER accuracy (mean over tasks)", ruler))]
    families = [(name, rs) for name, rs in families if rs]
    if not families:
        return None
    rows = [r for _, rs in families for r in rs]
    modes = [m for m in ("query_aware", "query_agnostic") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(families), len(modes), figsize=(6.2 * len(modes), 4.6 * len(families)),
                             squeeze=False)
    bases = sorted({split_label(r["method"])[0] for r in rows}, key=lambda b: (b != "full", b))
    for axrow, (name, rs) in zip(axes, families):
        for ax, mode in zip(axrow, modes):
            _plot_panel(ax, rs, mode, bases, name)
    axes[0][-1].legend(fontsize=7, loc="best")
    ctx = f" at {context} tokens" if context else ""
    what = " and ".join(name.split(" ")[0] for name, _ in families)
    fig.suptitle(title or f"{what} accuracy vs KV cache bytes{ctx}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(x, spec=".2f", na="n/a"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return na
    return format(x, spec)


def markdown_table(summary: Sequence[dict], *, prefix_ppl: Sequence[dict] = (), context: int | None = None,
                   methods: Sequence[str] | None = None, speed: Sequence[dict] = (),
                   ruler: Sequence[dict] = ()) -> str:
    """The README table: per method, passkey accuracy (query-aware / query-agnostic), the RULER-style
    mean when `ruler` rows (per method, mode and context) are given, perplexity change, KL and top-1
    against the full cache, kept / allocated cache bytes and decode ms/token (with its ratio to the
    full cache). Decode ms/token comes from the decode-speed rows measured at `context` with the
    smallest batch when there are any (side by side, stop tokens off; the ratio is then the run's
    ratio of medians with its per-round range), else from the query-aware passkey runs at `context`.
    Allocated bytes are per sequence and come from that same timed run when there is one (so the
    column matches the decode column), else from the query-agnostic passkey run (the context's cache
    alone; the query-aware one also holds question and answer). With a `context`, only methods measured
    at it get a row (perplexity rows alone are context-free and do not make one)."""
    rows = [r for r in summary if context is None or r["context"] == context]
    by = {(r["method"], r["mode"]): r for r in rows}
    ppl = {r["method"]: r for r in prefix_ppl}
    ru = {(r["method"], r["mode"]): r for r in ruler if context is None or r["context"] == context}
    sp = [r for r in speed if context is None or r["context"] == context]
    b_min = min((r["batch"] for r in sp), default=None)
    sp_row = {r["method"]: r for r in sp if r["batch"] == b_min}
    labels = list(methods) if methods else list(dict.fromkeys([r["method"] for r in rows] + [m for m, _ in ru]
                                                              + (list(ppl) if context is None else [])))
    full_ms = (sp_row.get("full") or by.get(("full", "query_aware")) or by.get(("full", "query_agnostic"))
               or {}).get("decode_ms_per_token")

    def order(label):
        base, b = split_label(label)
        try:
            bv = -float(b) if b and not b.endswith("t") else (0.0 if b else -2.0)
        except ValueError:
            bv = 0.0
        return (bv, base != "full", base)

    head = ["method", "budget", "passkey q-aware", "passkey q-agnostic"]
    head += ["RULER q-aware", "RULER q-agnostic"] if ru else []
    head += ["ppl change", "KL(full‖m)", "top-1", "kept KV (MiB)", "allocated (MiB)", "decode ms/token", "vs full"]
    cells = []
    for label in sorted(labels, key=order):
        base, b = split_label(label)
        qa, qg = by.get((label, "query_aware")), by.get((label, "query_agnostic"))
        any_row = qa or qg or ru.get((label, "query_aware")) or ru.get((label, "query_agnostic")) or {}
        p = ppl.get(label, {})
        timed = sp_row.get(label) or {}
        ms = (timed if sp_row else any_row).get("decode_ms_per_token")
        allocated = (timed["cache_bytes"] / timed["batch"] if timed.get("cache_bytes") is not None
                     else (qg or any_row).get("cache_bytes"))
        ratio = ms / full_ms if ms and full_ms else None
        row = [base, budget_text(b), _fmt(qa and qa["accuracy"], ".0%"), _fmt(qg and qg["accuracy"], ".0%")]
        if ru:
            row += [_fmt((ru.get((label, m)) or {}).get("accuracy"), ".2f") for m in ("query_aware", "query_agnostic")]
        row += [_fmt(p.get("ppl_change"), "+.1%"), _fmt(p.get("kl_mean"), ".3f"), _fmt(p.get("top1_agreement"), ".0%"),
                _fmt(any_row.get("kept_bytes") and any_row["kept_bytes"] / MiB, ".1f"),
                _fmt(allocated and allocated / MiB, ".1f"),
                _fmt(ms, ".1f"), _ratio_cell(timed, ratio)]
        cells.append(row)
    return _table(head, cells)


def _ratio_cell(speed_row: dict | None, fallback: float | None) -> str:
    """"0.87x (0.80-0.95)": the speed run's ratio of medians and its per-round range when measured
    side by side, else `fallback` (a ratio of two separately measured times)."""
    r = speed_row or {}
    if r.get("ratio_vs_full") is None:
        return _fmt(fallback, ".2f") + ("x" if fallback else "")
    lo, hi = r.get("ratio_vs_full_min"), r.get("ratio_vs_full_max")
    spread = f" ({_range(lo, hi, '.2f')})" if lo is not None and hi is not None and lo != hi else ""
    return f"{r['ratio_vs_full']:.2f}x{spread}"


# fields that name one case of a task (with method, mode and context): two runs may share a table row
# only when their records are different cases, e.g. a second haystack or seed run later
CASE_FIELDS = dict(passkey=("depth", "seed", "haystack", "n_keys"), ruler=("task", "value_type", "seed", "haystack"))


def merge_runs(payloads: Sequence[dict], *, speed_from: int | None = None) -> dict:
    """The table's inputs from several eval JSON payloads (e.g. a passkey/perplexity/speed grid and a
    RULER grid, or one run per context): passkey summary, prefix perplexity, decode speed and RULER
    rows per context. A row two payloads both measured is an error, not a silent choice, except that
    passkey and RULER rows whose runs hold different cases (another haystack, another seed) are
    summarized again over the union of their records.

    speed_from: the index of a payload whose decode-speed groups supersede the others' at the same
    (context, batch): ratios read from one column must come from one side-by-side timing, so a later
    run that times every row again replaces an earlier group of some rows rather than joining it."""
    keys = dict(passkey=("method", "mode", "context"), prefix_perplexity=("method",),
                decode_speed=("method", "context", "batch"), ruler=("method", "mode", "context"))
    if speed_from is not None and not 0 <= speed_from < len(payloads):
        raise ValueError(f"speed_from {speed_from}; allowed: a payload index in [0, {len(payloads)})")
    groups = ({(r["context"], r["batch"]) for r in payloads[speed_from].get("decode_speed", [])}
              if speed_from is not None else set())
    merged: dict[str, list] = {k: [] for k in keys}
    seen: dict[tuple, int] = {}
    for i, p in enumerate(payloads):
        speed = [r for r in p.get("decode_speed", []) if i == speed_from or (r["context"], r["batch"]) not in groups]
        parts = dict(passkey=p.get("passkey", {}).get("summary", []), prefix_perplexity=p.get("prefix_perplexity", []),
                     decode_speed=speed, ruler=p.get("ruler", {}).get("by_context", []))
        for section, rows in parts.items():
            for r in rows:
                k = (section,) + tuple(r[f] for f in keys[section])
                if k in seen:
                    at = merged[section].index(next(m for m in merged[section]
                                                    if tuple(m[f] for f in keys[section]) == k[1:]))
                    merged[section][at] = _union_row(section, k[1:], payloads, seen[k], i)
                else:
                    merged[section].append(r)
                seen[k] = i
    return merged


def _union_row(section: str, key: tuple, payloads: Sequence[dict], first: int, i: int) -> dict:
    """The row `key` of `section` summarized again over its records in payloads `first` (and any merged
    into it before) and `i`, when both runs kept their records and hold different cases of it."""
    fields = CASE_FIELDS.get(section)
    clash = ValueError(f"payloads {first} and {i} both hold {section} row {key}; pass each measurement once")
    if fields is None:
        raise clash

    def own(p: dict) -> list[dict]:
        return [r for r in p.get(section, {}).get("records", []) if (r["method"], r["mode"], r["context"]) == key]

    if not own(payloads[first]) or not own(payloads[i]):
        raise clash  # no records to tell the cases apart
    records = [r for p in payloads[:i + 1] for r in own(p)]
    cases = [tuple(r.get(f) for f in fields) for r in records]
    if len(set(cases)) < len(cases):
        raise clash
    rows = summarize(records, keys=("method", "mode", "context"),
                     metric="score" if section == "ruler" else "correct")
    if section == "ruler":
        rows[0]["all_correct"] = summarize(records, keys=("method", "mode", "context"))[0]["accuracy"]
    return rows[0]


def policy_tables(merged: dict, contexts: Sequence[int]) -> str:
    """One README table per context from `merge_runs` output (perplexity rows are context-free:
    a fixed compressed prefix, shown in every table)."""
    parts = []
    for c in contexts:
        parts += [f"Context {c} tokens{_cases_caption(merged, c)}:", "",
                  markdown_table(merged["passkey"], prefix_ppl=merged["prefix_perplexity"], context=c,
                                 speed=merged["decode_speed"], ruler=merged["ruler"]), ""]
    return "\n".join(parts)


def _cases_caption(merged: dict, context: int) -> str:
    """" (passkey: 3 cases per mode; RULER: 9 cases per mode)": how many cases each accuracy cell at `context` is
    out of, so tables built from grids of different sizes are read for what they are."""
    parts = []
    for section, name in (("passkey", "passkey"), ("ruler", "RULER")):
        ns = sorted({r["n"] for r in merged[section] if r["context"] == context and r.get("n") is not None})
        if ns:
            parts.append(f"{name}: {'/'.join(str(n) for n in ns)} cases per mode")
    return f" ({'; '.join(parts)})" if parts else ""


def _table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _range(lo, hi, spec=".1f", suffix="") -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"{format(lo, spec)}-{format(hi, spec)}{suffix}"


def speed_table(rows: Sequence[dict]) -> str:
    """Decode ms/token per (context, batch, method): median and min-max over the interleaved rounds,
    the ratio of medians to the full cache of the same run and the range of the per-round ratios."""
    return _table(["context", "batch", "method", "decode ms/token (median)", "min-max", "vs full", "vs full range",
                   "allocated (MiB)"],
                  [[r["context"], r["batch"], r["method"], _fmt(r["decode_ms_per_token"], ".1f"),
                    _range(r.get("decode_ms_per_token_min"), r.get("decode_ms_per_token_max")),
                    _fmt(r.get("ratio_vs_full"), ".2f") + "x",
                    _range(r.get("ratio_vs_full_min"), r.get("ratio_vs_full_max"), ".2f", "x"),
                    _fmt(r["cache_bytes"] / MiB, ".1f")] for r in rows])


def eviction_table(rows: Sequence[dict]) -> str:
    return _table(["method", "cache tokens", "text tokens", "perplexity", "change vs full"],
                  [[r["method"], r.get("cache_tokens") or "all", r["text_tokens"], _fmt(r["ppl"], ".2f"),
                    _fmt(r["ppl_change"], "+.1%")] for r in rows])


def passkey_breakdown(records: Sequence[dict], *, keys=("haystack", "n_keys")) -> str:
    """Accuracy per method and mode split by `keys` (e.g. haystack and number of keys)."""
    rows = summarize(list(records), ("method", "mode") + tuple(keys))
    cols = sorted({tuple(r[k] for k in keys) for r in rows}, key=str)
    head = "| method | mode | " + " | ".join("/".join(map(str, c)) for c in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    cell = {(r["method"], r["mode"]) + tuple(r[k] for k in keys): r for r in rows}
    for m, mode in dict.fromkeys((r["method"], r["mode"]) for r in rows):
        vals = [cell.get((m, mode) + c) for c in cols]
        lines.append(f"| {m} | {mode} | " + " | ".join(_fmt(v and v["accuracy"], ".0%") for v in vals) + " |")
    return "\n".join(lines)


def ruler_table(summary: Sequence[dict]) -> str:
    """RULER accuracy (mean string-match-all) per method, mode and context (rows) and task (columns),
    with the mean over the tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    cell = {(r["method"], r["mode"], r["context"], r["task"]): r["accuracy"] for r in summary}
    rows = []
    for m, mode, ctx in dict.fromkeys((r["method"], r["mode"], r["context"]) for r in summary):
        accs = [cell.get((m, mode, ctx, t)) for t in tasks]
        known = [a for a in accs if a is not None]
        rows.append([m, mode, ctx] + [_fmt(a, ".0%") for a in accs]
                    + [_fmt(float(np.mean(known)) if known else None, ".0%")])
    return _table(["method", "mode", "context"] + tasks + ["mean"], rows)


__all__ = ["CASE_FIELDS", "budget_text", "eviction_table", "markdown_table", "merge_runs", "passkey_breakdown",
           "plot_accuracy_vs_bytes", "policy_tables", "ruler_table", "speed_table", "split_label", "write_json"]
