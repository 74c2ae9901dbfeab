"""Which of the passkey needle's digit tokens does a policy keep after prefill, per layer and KV head?

    python scripts/trace_needle_residency.py --policies snapkv,h2o,tova --budget 0.5 --context 2048
    python scripts/trace_needle_residency.py --policies snapkv,pyramidkv,adakv,tova,expected_attention,kvzip \
        --budget 0.25 --mode query_agnostic --out benchmarks/needle-residency-2k.json

Builds the passkey prompts of the evaluation (depths 10/50/90%, repetitive and varied haystacks; the
context and question for query_aware, the context alone for query_agnostic), prefills them into each
policy's cache and prints, per case, the share of digit tokens resident in each layer (mean over KV
heads), then the mean over cases, layers and heads and the share of (layer, KV head) pairs that hold
every digit. Any layout (uniform, pooled) is read through `head_positions()`. Used to read why a policy
that keeps many of the needle's tokens still fails the retrieval (README, policy table notes).

Where the full model looks for the needle: for each case the full cache is teacher-forced on context,
question and answer (`PiKVModel.capture_qkv`, post-RoPE), and every query that predicts an answer token
gives the softmax mass it puts on the needle's digit tokens, averaged over those queries and over the
query heads of each KV head's group: `needle_attention` f32[L, Hkv]. The (layer, KV head) pairs with
the most mass are the retrieval heads of this case. Each policy's residency is then also reported
weighted by that mass (`retrieval_weighted`: the share of the model's needle attention whose keys the
policy kept) and restricted to the case's top-k retrieval heads.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import write_json
from pikv_jax.cache.policies import make_policy
from pikv_jax.cache.policies.base import init_policy_cache
from pikv_jax.eval import passkey as pk
from pikv_jax.eval.methods import _parse_options
from pikv_jax.runtime.forward import prefill


def digit_positions(codec, case) -> list[int]:
    needle = case.context[case.needle_start:case.needle_start + case.needle_len]
    return [case.needle_start + i for i, t in enumerate(needle) if codec.decode([t]).strip().isdigit()]


def residency(model, policy, case, digits, mode: str) -> np.ndarray:
    """f32[L, Hkv]: share of `digits` resident in each layer / KV head after prefill."""
    cfg = model.config
    toks = list(case.context) + (list(case.question) if mode == "query_aware" else [])
    caps = tuple(policy.capacity_for(i, len(toks), 8) for i in range(cfg.num_hidden_layers))
    cache = init_policy_cache(policy, 1, caps, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                              dtype=model.cache_dtype)
    _, out = jax.jit(lambda t, n, c: prefill(model.model, t, n, c, policy))(
        jnp.asarray([toks], jnp.int32), jnp.asarray([len(toks)], jnp.int32), cache)
    heads = [np.asarray(layer.head_positions())[0] for layer in out.layers]  # [Hkv, C] per layer
    return np.array([[np.isin(digits, pos[h]).mean() for h in range(pos.shape[0])] for pos in heads])


def needle_attention(model, case, digits) -> np.ndarray:
    """f32[L, Hkv]: mean softmax mass the full model's answer-predicting queries put on `digits`."""
    answer = model.tokenizer.encode(" " + case.answer) if model.tokenizer is not None else []
    toks = list(case.context) + list(case.question) + list(answer)
    first = len(case.context) + len(case.question) - 1  # the query that predicts the first answer token
    rows = []
    for layer in model.capture_qkv([toks], max_tokens=len(toks)):
        q = layer.q[0, first:len(toks) - 1 if answer else first + 1]  # [A, H, D]
        k = layer.k[0, :, :len(toks)]  # [Hkv, S, D]
        group = q.shape[1] // k.shape[0]
        logits = np.einsum("ahd,hsd->ahs", q, np.repeat(k, group, axis=0)) / np.sqrt(q.shape[-1])
        causal = np.arange(len(toks))[None, None, :] <= (first + np.arange(q.shape[0]))[:, None, None]
        logits = np.where(causal, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        mass = p[:, :, digits].sum(-1).mean(0)  # [H]
        rows.append(mass.reshape(k.shape[0], group).mean(-1))
    return np.stack(rows)


def weighted(resident: np.ndarray, attention: np.ndarray, top: int) -> tuple[float, float]:
    """(residency weighted by needle attention, mean residency over the `top` pairs with most attention)."""
    order = np.argsort(attention.ravel())[::-1][:top]
    return float((resident * attention).sum() / attention.sum()), float(resident.ravel()[order].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default="snapkv,snapkv(obs_window=16),h2o,tova")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--mode", choices=("query_aware", "query_agnostic"), default="query_aware")
    ap.add_argument("--top-heads", type=int, default=8, help="retrieval heads per case for the top-k residency")
    ap.add_argument("--out", default=None, help="JSON with per-policy, per-case, per-layer and per-head residency")
    args = ap.parse_args(argv)
    from pikv_jax.eval.methods import _split_top

    model = PiKVModel.from_pretrained("smollm2")
    codec = pk.codec_for(model)
    cases = pk.build_cases(codec, contexts=[args.context], depths=[0.1, 0.5, 0.9], seeds=[0],
                           haystacks=["repetitive", "varied"], keys=[1])
    report = dict(context=args.context, budget=args.budget, mode=args.mode, top_heads=args.top_heads, policies={})
    attention = [needle_attention(model, case, digit_positions(codec, case)) for case in cases]
    report["needle_attention"] = [dict(haystack=c.haystack, depth=c.depth, per_layer_head=np.round(a, 4).tolist())
                                  for c, a in zip(cases, attention)]
    for c, a in zip(cases, attention):
        top = np.argsort(a.ravel())[::-1][:args.top_heads]
        print(f"retrieval heads {c.haystack:10s} depth {c.depth:.1f}: "
              f"{[(int(i) // a.shape[1], int(i) % a.shape[1], round(float(a.ravel()[i]), 3)) for i in top]}",
              flush=True)
    for spec in _split_top(args.policies):
        name, _, opts = spec.partition("(")
        options = _parse_options(opts.rstrip(")") or None, spec, takes_scorer=name == "adakv")
        layers = model.config.num_hidden_layers
        policy = model.bind_policy(make_policy(name, num_layers=layers, budget_ratio=args.budget, **options))
        per_case = []
        for case in cases:
            r = residency(model, policy, case, digit_positions(codec, case), args.mode)
            per_case.append(r)
            print(f"{spec:24s} {case.haystack:10s} depth {case.depth:.1f}: per layer "
                  f"{np.round(r.mean(axis=1), 2).tolist()}", flush=True)
        r = np.stack(per_case)
        w = np.array([weighted(x, a, args.top_heads) for x, a in zip(per_case, attention)])
        print(f"== {spec}@{args.budget:g}: digits resident {r.mean():.3f} (mean over cases, layers, heads); "
              f"layer-heads holding every digit {(r == 1).mean():.3f}; weighted by needle attention "
              f"{w[:, 0].mean():.3f}; in the top {args.top_heads} retrieval heads {w[:, 1].mean():.3f} "
              f"(per case {np.round(w[:, 1], 2).tolist()})", flush=True)
        report["policies"][spec] = dict(
            digits_resident=float(r.mean()), layer_heads_with_every_digit=float((r == 1).mean()),
            retrieval_weighted=float(w[:, 0].mean()), top_retrieval_heads=float(w[:, 1].mean()),
            per_case_retrieval_weighted=np.round(w[:, 0], 3).tolist(),
            per_case_top_retrieval_heads=np.round(w[:, 1], 3).tolist(),
            per_layer=np.round(r.mean(axis=(0, 2)), 3).tolist(),
            cases=[dict(haystack=c.haystack, depth=c.depth, per_layer_head=np.round(x, 3).tolist())
                   for c, x in zip(cases, per_case)])
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
