"""Perplexity under cache compression, on held-out text (the last paragraphs of the varied
haystack, never used in passkey contexts).

(a) prefix compression: the policy compresses a prefix of `prefix_len` tokens at prefill; the next
    `cont_len` tokens are teacher-forced through the decode path (decode-time eviction, if the
    policy has it, applies as well). Several windows of the text make the rows of one batch.
(b) decode-time eviction: the policy's cache holds `cache_tokens` slots (e.g. StreamingLLM with
    budget_tokens = 512); the first `cache_tokens` tokens are the prompt and the rest of a text
    `text_factor` times longer than the cache is teacher-forced, so eviction runs every step.

Both report NLL per token, perplexity, and the change against the full cache on the same tokens.
"""

from __future__ import annotations

from typing import Sequence

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.eval.fidelity import compare, nll_stats, teacher_forced_pass
from pikv_jax.eval.passkey import codec_for, haystack_text, split_heldout


def heldout_ids(model, *, haystack: str = "varied", codec=None) -> list[int]:
    """Token ids of the held-out part of a shipped text (or of a file, whole)."""
    codec = codec or codec_for(model)
    text = haystack_text(haystack)
    if "\n\n" in text:
        text = split_heldout(text)[1]
    return codec.encode(" ".join(text.split()))


def prefix_windows(ids: Sequence[int], prefix_len: int, cont_len: int, n_windows: int):
    """`n_windows` (prefix, continuation) pairs spread evenly over `ids` (cyclic if too short)."""
    need = prefix_len + cont_len
    if need > len(ids) * 2:
        raise ValueError(f"text of {len(ids)} tokens is too short for prefix {prefix_len} + continuation {cont_len}")
    span = max(len(ids) - need, 0)
    starts = [int(round(i * span / max(n_windows - 1, 1))) for i in range(n_windows)] if n_windows > 1 else [0]
    ext = list(ids) + list(ids)
    return [(ext[s: s + prefix_len], ext[s + prefix_len: s + need]) for s in starts]


def _report(rows: list, row: dict, res: dict, base: dict, on_row, progress, extra: dict | None = None) -> None:
    """Completes one method's row (NLL statistics, perplexity against the full cache's), appends it
    and tells the callbacks."""
    row.update(nll_stats(res["token_logprobs"], res["lengths"]))
    row["ppl_full"] = base["ppl"]
    row["ppl_change"] = row["ppl"] / base["ppl"] - 1.0
    row.update(extra or {})
    rows.append(row)
    if on_row:
        on_row(row)
    if progress:
        progress(row["method"])


def prefix_perplexity(model, methods, ids: Sequence[int], *, prefix_len: int, cont_len: int, n_windows: int = 2,
                      with_fidelity: bool = True, progress=None, cached: dict | None = None,
                      on_row=None, errors: list | None = None) -> list[dict]:
    """(a): per method NLL, perplexity and its change vs the full cache (plus KL / top-1 when
    `with_fidelity`, from the same pass). `cached`: rows by method label already computed (an
    interrupted run); `on_row(row)` is called for each new row. The full-cache reference pass runs
    only when some method needs it."""
    cached = cached or {}
    pairs = prefix_windows(ids, prefix_len, cont_len, n_windows)
    prompts, conts = [p for p, _ in pairs], [c for _, c in pairs]
    ref = base = None
    rows = []
    for m in methods:
        if m.label in cached:
            rows.append(cached[m.label])
            continue
        if ref is None:
            ref = teacher_forced_pass(model, CachePolicy(), prompts, conts, full=with_fidelity)
            base = nll_stats(ref["token_logprobs"], ref["lengths"])
            if progress:
                progress("full (reference)")
        try:
            res = ref if m.is_full else teacher_forced_pass(model, m.policy, prompts, conts, full=with_fidelity)
        except Exception as e:
            if errors is None:
                raise
            errors.append(dict(task="prefix_perplexity", method=m.label, error=f"{type(e).__name__}: {e}"))
            continue
        row = dict(method=m.label, prefix_len=prefix_len, cont_len=cont_len, windows=len(pairs))
        _report(rows, row, res, base, on_row, progress, compare(ref, res) if with_fidelity else None)
    return rows


def eviction_perplexity(model, methods, ids: Sequence[int], *, cache_tokens: int = 512, text_factor: int = 4,
                        progress=None, cached: dict | None = None, on_row=None,
                        errors: list | None = None) -> list[dict]:
    """(b): a text `text_factor` x `cache_tokens` long; the first `cache_tokens` tokens are the
    prompt (the whole budget), the rest is scored while the policy evicts every step. Methods
    should carry a token budget of `cache_tokens` (e.g. "streaming_llm@512t"). The first row is
    the full cache on the same tokens. `cached` / `on_row` as in `prefix_perplexity`."""
    cached = cached or {}
    total = cache_tokens * text_factor
    if len(ids) < total:
        raise ValueError(f"held-out text has {len(ids)} tokens; eviction perplexity needs {total} "
                         f"({text_factor} x cache of {cache_tokens})")
    prompt, cont = [list(ids[:cache_tokens])], [list(ids[cache_tokens: total])]
    rows = []
    base = cached.get("full")
    if base is None:
        ref = teacher_forced_pass(model, CachePolicy(), prompt, cont, full=False)
        st = nll_stats(ref["token_logprobs"], ref["lengths"])
        base = dict(method="full", cache_tokens=None, text_tokens=total, **st, ppl_full=st["ppl"], ppl_change=0.0)
        if on_row:
            on_row(base)
        if progress:
            progress("full (reference)")
    rows.append(base)
    for m in methods:
        if m.is_full:
            continue
        if m.label in cached:
            rows.append(cached[m.label])
            continue
        try:
            res = teacher_forced_pass(model, m.policy, prompt, cont, full=False)
        except Exception as e:
            if errors is None:
                raise
            errors.append(dict(task="eviction_perplexity", method=m.label, error=f"{type(e).__name__}: {e}"))
            continue
        _report(rows, dict(method=m.label, cache_tokens=cache_tokens, text_tokens=total), res, base, on_row, progress)
    return rows


__all__ = ["eviction_perplexity", "heldout_ids", "prefix_perplexity", "prefix_windows"]
