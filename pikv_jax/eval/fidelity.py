"""Logit fidelity: how far a compressed cache moves the next-token distribution from the full cache's.

For each continuation position t the model's next-token log-distribution under the full cache,
log p_t, and under a method, log q_t, are compared (teacher forcing: the same continuation tokens
are fed to both, through the decode path, so decode-time eviction applies):

    KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))        top-1: argmax p_t == argmax q_t

averaged over every valid position of every row. The same pass yields the continuation's NLL, so
`teacher_forced_pass` serves perplexity under prefix compression too.
"""

from __future__ import annotations

import numpy as np

from pikv_jax.cache.policies.base import CachePolicy


def kl_divergence(logp_ref: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(ref || other) over the last axis of two log-probability arrays f32[..., V] -> f32[...].

    Exactly 0 for identical inputs; clipped at 0 against float round-off."""
    logp_ref = np.asarray(logp_ref, np.float64)
    logp = np.asarray(logp, np.float64)
    if logp_ref.shape != logp.shape:
        raise ValueError(f"shapes differ: {logp_ref.shape} vs {logp.shape}")
    p = np.exp(logp_ref)
    diff = np.where(p > 0, logp_ref - logp, 0.0)
    return np.maximum(np.sum(p * diff, axis=-1), 0.0)


def top1_agreement(logp_ref: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """bool[...]: the most likely token is the same under both distributions."""
    return np.argmax(logp_ref, axis=-1) == np.argmax(logp, axis=-1)


def valid_mask(lengths, width: int) -> np.ndarray:
    """bool[B, T]: position t of row b is scored (t < lengths[b])."""
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def target_logprobs(full_logprobs: np.ndarray, continuations) -> np.ndarray:
    """f32[B, T] log-probability of each continuation token from the full distributions [B, T, V]."""
    b, t, _ = full_logprobs.shape
    tgt = np.zeros((b, t), np.int64)
    for i, c in enumerate(continuations):
        tgt[i, : len(c)] = c
    return np.take_along_axis(full_logprobs, tgt[..., None], axis=-1)[..., 0]


def teacher_forced_pass(model, policy, prompts, continuations, *, full: bool = True) -> dict:
    """One teacher-forced pass: {"logprobs": f32[B, T, V] (if full), "token_logprobs": f32[B, T],
    "lengths": i32[B]}. prompts / continuations: token-id lists."""
    out, lengths = model.teacher_forced(prompts, continuations, policy=policy, full_logprobs=full)
    res = {"lengths": lengths}
    if full:
        res["logprobs"] = out
        res["token_logprobs"] = target_logprobs(out, continuations)
    else:
        res["token_logprobs"] = out
    return res


def nll_stats(token_logprobs: np.ndarray, lengths) -> dict:
    """Mean NLL per token (nats) and perplexity over the valid positions."""
    mask = valid_mask(lengths, token_logprobs.shape[1])
    n = int(mask.sum())
    nll = float(-np.sum(np.where(mask, token_logprobs, 0.0)) / max(n, 1))
    return {"nll": nll, "ppl": float(np.exp(nll)), "tokens": n}


def compare(reference: dict, other: dict) -> dict:
    """KL(full || method) and top-1 agreement between two `teacher_forced_pass` results."""
    ref, lp = reference["logprobs"], other["logprobs"]
    mask = valid_mask(reference["lengths"], ref.shape[1])
    kl = kl_divergence(ref, lp)[mask]
    top1 = top1_agreement(ref, lp)[mask]
    return {"kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_max": float(kl.max()),
            "top1_agreement": float(top1.mean()), "positions": int(mask.sum())}


def logit_fidelity(model, methods, prompts, continuations, *, reference: dict | None = None,
                   progress=None) -> tuple[list[dict], dict]:
    """KL / top-1 / NLL of every method against the full cache on fixed (prompt, continuation)
    pairs. Returns (rows, full-cache pass) so callers can reuse the reference."""
    if reference is None:
        reference = teacher_forced_pass(model, CachePolicy(), prompts, continuations)
        if progress:
            progress("full (reference)")
    base = nll_stats(reference["token_logprobs"], reference["lengths"])
    rows = []
    for m in methods:
        res = reference if m.is_full else teacher_forced_pass(model, m.policy, prompts, continuations)
        row = {"method": m.label, **compare(reference, res), **nll_stats(res["token_logprobs"], res["lengths"])}
        row["ppl_full"] = base["ppl"]
        row["ppl_change"] = row["ppl"] / base["ppl"] - 1.0
        rows.append(row)
        if progress:
            progress(m.label)
    return rows, reference


__all__ = ["compare", "kl_divergence", "logit_fidelity", "nll_stats", "target_logprobs", "teacher_forced_pass",
           "top1_agreement", "valid_mask"]
