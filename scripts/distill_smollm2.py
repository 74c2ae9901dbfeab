"""Distillation on the real SmolLM2-135M (CPU): a LoRA KV compressor against its SVD initialisation, and a
learned DuoAttention pattern against random patterns of the same sparsity. Writes
benchmarks/distill-smollm2.json (each stage updates its own key).

    python scripts/distill_smollm2.py --stage lora   # configs/distill_lora.yaml (rank 16 of 64, K and V)
    python scripts/distill_smollm2.py --stage duo    # configs/distill_duo.yaml, then passkey accuracy
    python scripts/distill_smollm2.py --stage moe    # configs/distill_moe.yaml on SmolLM2's MLP at layer 3

Training runs through `pikv_jax.train.trainer.train` in resumable run directories (--runs), so an
interrupted stage continues where it stopped and a finished one is only re-evaluated.

lora: held-out KL(full || compressed) of the next-token distribution, computed two ways: by the training
  forward (eval.json) and through the generation path (`PiKVModel.teacher_forced` with
  `SVDCompressor(rank).as_policy()` vs the trained `LoRACompressor.as_policy()`: the prompt is prefilled
  into the compressed cache, the continuation decoded token by token against it).
duo: passkey accuracy (pikv_jax/eval/passkey.py harness, answer substring match) of DuoAttention with the
  learned pattern, random patterns with the same number of retrieval heads, the training-free
  attention-statistics calibration at the same sparsity, and the full cache.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _kl_generation_path(base, policies: dict, heldout: list[dict], prefix: int) -> dict:
    """KL(full || policy) and top-1 agreement over decoded continuation tokens of held-out windows."""
    from pikv_jax.cache.policies.base import CachePolicy

    prompts, conts = [], []
    for b in heldout:
        for t, n in zip(b["tokens"], b["lengths"]):
            prompts.append(list(map(int, t[:prefix])))
            conts.append(list(map(int, t[prefix:n])))
    ref, lens = base.teacher_forced(prompts, conts, policy=CachePolicy(), full_logprobs=True)
    valid = np.arange(ref.shape[1])[None] < lens[:, None]
    valid[:, 0] = False  # position 0 comes from the (exact) prefill logits
    out = {}
    for label, pol in policies.items():
        t0 = time.perf_counter()
        lp, _ = base.teacher_forced(prompts, conts, policy=pol, full_logprobs=True)
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        agree = ref.argmax(-1) == lp.argmax(-1)
        out[label] = dict(kl=float(kl[valid].mean()), top1_agreement=float(agree[valid].mean()),
                          tokens=int(valid.sum()), seconds=round(time.perf_counter() - t0, 1))
    return out


def stage_lora(args, overrides) -> dict:
    from pikv_jax.compress.svd import SVDCompressor
    from pikv_jax.train.config import load_config
    from pikv_jax.train.lora import load_compressor
    from pikv_jax.train.task import build_task
    from pikv_jax.train.trainer import train

    cfg = load_config(ROOT / "configs" / "distill_lora.yaml", overrides)
    run_dir = pathlib.Path(args.runs) / "lora-smollm2"
    task = build_task(cfg)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, task=task, progress=not args.quiet)
    wall = time.perf_counter() - t0
    svd = SVDCompressor(rank=cfg.lora.rank).calibrate(task.base, prompts=task.calib_prompts,
                                                      max_tokens=task.batches.seq_len)
    trained = load_compressor(run_dir / "lora_compressor.npz")
    heldout = task.batches.heldout(cfg.eval.batches, cfg.eval.batch_size or cfg.data.batch_size)
    gen = _kl_generation_path(task.base, {"svd": svd.as_policy(), "lora": trained.as_policy()}, heldout,
                              task.batches.prefix_len)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    h = summary["heldout"]
    return dict(
        config="configs/distill_lora.yaml", overrides=overrides, run_dir=str(run_dir),
        model="smollm2 (SmolLM2-135M-Instruct, float32)", rank=cfg.lora.rank, head_dim=task.base.config.dim_per_head,
        steps=cfg.train.steps, trainable_params=summary["trainable_params"],
        data=dict(text=list(cfg.data.text_files), seq_len=cfg.data.seq_len, prefix_len=cfg.data.prefix_len,
                  batch_size=cfg.data.batch_size, heldout_windows=sum(len(b["tokens"]) for b in heldout)),
        heldout_training_forward=dict(svd_init=h["initial"], trained=h["final"]),
        heldout_generation_path=gen,
        train_loss_first10=float(np.mean(losses[:10])), train_loss_last10=float(np.mean(losses[-10:])),
        seconds_per_step_median=float(np.median([m["seconds"] for m in metrics[1:]])) if len(metrics) > 1 else None,
        wall_seconds_this_call=round(wall, 1),
        beats_svd=bool(gen["lora"]["kl"] < gen["svd"]["kl"] and h["final"]["kl_t1"] < h["initial"]["kl_t1"]),
    )


def stage_duo(args, overrides) -> dict:
    from pikv_jax.calibrate import duo as dc
    from pikv_jax.train.config import load_config
    from pikv_jax.train.duo import passkey_comparison, random_patterns
    from pikv_jax.train.task import build_task
    from pikv_jax.train.trainer import train

    cfg = load_config(ROOT / "configs" / "distill_duo.yaml", overrides)
    run_dir = pathlib.Path(args.runs) / "duo-smollm2"
    task = build_task(cfg)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, task=task, progress=not args.quiet)
    wall = time.perf_counter() - t0
    learned = dc.load_pattern(run_dir / cfg.duo.pattern_file)
    shape = (len(learned.retrieval), len(learned.retrieval[0]))
    n_ret = int(np.sum(learned.retrieval))
    frac = n_ret / (shape[0] * shape[1])
    patterns = {"learned": learned}
    for i, p in enumerate(random_patterns(shape, n_ret, args.random, seed=123)):
        patterns[f"random{i}"] = p
    calib_prompts = dc.passkey_prompts(4, cfg.data.seq_len, tokenizer=task.base.tokenizer, seed=1234)
    stats = dc.calibrate(task.base, calib_prompts, n_sink=cfg.duo.n_sink, window=cfg.duo.window,
                         retrieval_fraction=frac, batch_size=1)
    patterns["attention_statistics"] = stats
    results = {}
    for ctx in args.contexts:
        t1 = time.perf_counter()
        res = passkey_comparison(task.base, patterns, n_sink=cfg.duo.n_sink, window=cfg.duo.window, context_len=ctx,
                                 num_cases=args.cases, modes=tuple(args.modes), haystacks=tuple(args.haystacks))
        res["seconds"] = round(time.perf_counter() - t1, 1)
        results[str(ctx)] = res
        print(f"[distill_smollm2] duo passkey @ {ctx}: {res['accuracy']}", file=sys.stderr, flush=True)
    rand = {c: float(np.mean([r["accuracy"][k] for k in r["accuracy"] if k.startswith("random")]))
            for c, r in results.items()}
    alpha = np.asarray(learned.scores)
    return dict(
        config="configs/distill_duo.yaml", overrides=overrides, run_dir=str(run_dir),
        model="smollm2 (SmolLM2-135M-Instruct, float32)", steps=cfg.train.steps, n_sink=cfg.duo.n_sink,
        window=cfg.duo.window, l1=cfg.duo.l1, train_seq_len=cfg.data.seq_len, retrieval_heads=n_ret,
        num_heads=int(alpha.size), retrieval_fraction=frac, pattern_file=str(run_dir / cfg.duo.pattern_file),
        alpha_summary=dict(mean=float(alpha.mean()), min=float(alpha.min()), max=float(alpha.max()),
                           above_0_5=int((alpha >= 0.5).sum())),
        heldout_training_forward=summary["heldout"], passkey=results, random_mean_accuracy=rand,
        learned_beats_random=bool(all(results[c]["accuracy"]["learned"] > rand[c] for c in results)),
        wall_seconds_this_call=round(wall, 1),
    )


def stage_moe(args, overrides) -> dict:
    from pikv_jax.train.config import load_config
    from pikv_jax.train.trainer import train

    over = ["model.name=smollm2", "moe.hidden_size=64", "moe.teacher_layer=3", *overrides]
    cfg = load_config(ROOT / "configs" / "distill_moe.yaml", over)
    run_dir = pathlib.Path(args.runs) / "moe-smollm2"
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, progress=not args.quiet)
    return dict(config="configs/distill_moe.yaml", overrides=over, run_dir=str(run_dir), steps=cfg.train.steps,
                student_hidden=summary["student_hidden"], teacher_hidden=summary["teacher_hidden"],
                teacher_layer=summary["teacher_layer"], num_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k,
                trainable_params=summary["trainable_params"], heldout=summary["heldout"],
                wall_seconds_this_call=round(time.perf_counter() - t0, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["lora", "duo", "moe", "all"], default="all")
    ap.add_argument("--runs", default="/tmp/distill-runs", help="run directories (resumable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "distill-smollm2.json"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024])
    ap.add_argument("--cases", type=int, default=8, help="passkey depths per context and haystack")
    ap.add_argument("--modes", nargs="+", default=["query_agnostic", "query_aware"])
    ap.add_argument("--haystacks", nargs="+", default=["repetitive", "varied"])
    ap.add_argument("--random", type=int, default=3, help="random patterns of the learned pattern's sparsity")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--lora-override", action="append", default=[], help="dotted override of the LoRA config")
    ap.add_argument("--duo-override", action="append", default=[], help="dotted override of the Duo config")
    ap.add_argument("--moe-override", action="append", default=[], help="dotted override of the MoE config")
    args = ap.parse_args(argv)
    out_path = pathlib.Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    import jax

    result["environment"] = dict(jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count())
    if args.stage in ("lora", "all"):
        result["lora"] = stage_lora(args, args.lora_override)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    if args.stage in ("duo", "all"):
        result["duo"] = stage_duo(args, args.duo_override)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    if args.stage in ("moe", "all"):
        result["moe"] = stage_moe(args, args.moe_override)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"})[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
