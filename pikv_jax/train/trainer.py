"""The training loop of `pikv distill`: resume, checkpoints, metrics, progress, held-out evaluation.

Run directory layout:

    config.yaml        the resolved config (a resumed run must match it; see RESUMABLE_KEYS)
    checkpoints/<step> orbax checkpoints (keep N, every K steps, and the last step)
    metrics.jsonl      one JSON object per logged step: step, loss, metric terms, lr, seconds
    eval.json          held-out evaluation of the initial and the trained student, plus artifacts
    <artifacts>        duo_pattern.json (duo), lora_compressor.npz/.json (lora)

Determinism: batch s is a function of (seed, s) and the checkpoint holds params, optimizer state, the
carried PRNG key and the step, so a run killed at any point and resumed from its last checkpoint ends
with bitwise the same parameters as an uninterrupted one (on the same machine and device count).

Resume policy: resume=None resumes when the run has checkpoints; resume=True requires one
(FileNotFoundError naming the directory otherwise); resume=False refuses a run directory that already
has checkpoints. A checkpoint that cannot be restored raises `CheckpointError`: training never falls
back silently to a fresh start.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm

from pikv_jax.train.checkpoint import Checkpointer, abstract_like
from pikv_jax.train.config import DistillConfig, config_from_dict, dump_config
from pikv_jax.train.task import build_task
from pikv_jax.trainstep import count_params, data_mesh, make_optimizer, make_train_step, shard_batch, split_trainable
from pikv_jax.trainstep import replicate as _replicate

log = logging.getLogger("pikv_jax")

# config keys a resumed run may change (everything else must equal the saved config)
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.step_delay_s", "checkpoint.every", "checkpoint.keep",
                  "eval.batches", "eval.batch_size")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k != "tiny":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_resume_config(saved: DistillConfig, cfg: DistillConfig, path) -> None:
    a, b = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ValueError(f"cannot resume the run in {str(path)!r} with a different config ({shown}); only "
                         f"{', '.join(RESUMABLE_KEYS)} may change. Use another --run-dir for a new run")


def _truncate_metrics(path: pathlib.Path, upto: int) -> None:
    """Keeps the metric lines of steps <= upto (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= upto:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by the kill
    path.write_text("".join(x + "\n" for x in keep))


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                desc="distill", leave=True)


def prepare_run(cfg: DistillConfig, run_dir, resume: bool | None) -> tuple[Checkpointer, bool]:
    """Checks the run directory against the resume policy; returns (checkpointer, resuming)."""
    run_dir = pathlib.Path(run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, every=cfg.checkpoint.every)
    steps = ckpt.steps()
    if resume is True and not steps:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {str(ckpt.directory)!r}")
    if resume is False and steps:
        raise ValueError(f"--no-resume: {str(run_dir)!r} already holds checkpoints (steps {steps}); resume it "
                         "(drop --no-resume) or choose a new --run-dir")
    resuming = bool(steps) and resume is not False
    cfg_path = run_dir / "config.yaml"
    if resuming:
        if not cfg_path.is_file():
            raise FileNotFoundError(f"cannot resume: {str(cfg_path)!r} is missing (the run's config)")
        check_resume_config(config_from_dict(yaml.safe_load(cfg_path.read_text())), cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(dump_config(cfg))
    return ckpt, resuming


def train(cfg: DistillConfig, run_dir, *, resume: bool | None = None, progress: bool = True,
          task=None) -> dict:
    """Runs (or resumes) a distillation; returns the evaluation summary (also written to eval.json)."""
    run_dir = pathlib.Path(run_dir)
    ckpt, resuming = prepare_run(cfg, run_dir, resume)
    try:
        return _train(cfg, run_dir, ckpt, resuming, progress, task)
    finally:
        ckpt.close()


def _train(cfg, run_dir, ckpt, resuming, progress, task) -> dict:
    t_setup = time.perf_counter()
    task = task if task is not None else build_task(cfg)
    sp, params0 = split_trainable(task.module, task.trainable)
    initial = {k: np.array(v) for k, v in params0.items()}
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    mesh = data_mesh(cfg.mesh.data)

    def place(tree, replicate: bool = False):
        """Puts a host pytree on the devices: replicated (parameters) or split over `data` (batches)."""
        return _replicate(tree, mesh) if replicate else shard_batch(tree, mesh)

    params = _replicate({k: jnp.array(v) for k, v in params0.items()}, mesh)
    state = {"params": params, "opt_state": tx.init(params),
             "rng": _replicate(jax.random.PRNGKey(cfg.train.seed), mesh), "step": jnp.int32(0)}
    state["opt_state"] = _replicate(state["opt_state"], mesh)
    start = 0
    if resuming:
        state, _ = ckpt.restore(abstract_like(state))
        start = int(state["step"])
        log.info("resumed %s at step %d", run_dir, start)
    frozen = _replicate(sp.frozen, mesh)
    step_fn = make_train_step(sp, lambda m, b, r: task.loss(m, b, r, train=True), tx, project=task.project)
    metrics_path = run_dir / "metrics.jsonl"
    if resuming:
        _truncate_metrics(metrics_path, start)
    elif metrics_path.exists():
        metrics_path.unlink()
    setup_s = time.perf_counter() - t_setup
    steps = cfg.train.steps
    info = dict(task.describe(), trainable_params=count_params(initial),
                devices=jax.device_count(), data_parallel=1 if mesh is None else mesh.size)
    log.info("distill %s: %s", cfg.task, info)

    p, o, r = state["params"], state["opt_state"], state["rng"]
    bar = _progress(steps, min(start, steps), progress)
    t_train = time.perf_counter()
    with open(metrics_path, "a") as mf:
        for s in range(start, steps):
            t0 = time.perf_counter()
            batch = place(task.batches.batch(s))
            p, o, r, m = step_fn(p, o, frozen, batch, r)
            m = {k: float(v) for k, v in m.items()}
            dt = time.perf_counter() - t0
            done = s + 1
            if done % cfg.train.log_every == 0 or done == steps:
                mf.write(json.dumps(dict(step=done, **m, lr=float(schedule(s)), seconds=round(dt, 6))) + "\n")
                mf.flush()
            ckpt.save(done, {"params": p, "opt_state": o, "rng": r, "step": jnp.int32(done)},
                      meta={"task": cfg.task}, force=done == steps)
            bar.set_postfix(loss=f"{m['loss']:.4g}")
            bar.update(1)
            if cfg.train.step_delay_s:
                time.sleep(cfg.train.step_delay_s)
    bar.close()
    train_s = time.perf_counter() - t_train
    if start >= steps:
        log.info("run %s is already complete (step %d); re-evaluating", run_dir, start)

    final = {k: np.asarray(v) for k, v in p.items()}
    eb = cfg.eval.batch_size or cfg.data.batch_size
    heldout = task.batches.heldout(cfg.eval.batches, eb)
    t_eval = time.perf_counter()
    evaluation = task.evaluate(sp, initial, final, heldout, place) if heldout else {}
    module = sp.merge({k: jnp.asarray(v) for k, v in final.items()})
    artifacts = task.export(module, run_dir)
    summary = dict(info, steps=steps, resumed_from=start if resuming else None, heldout=evaluation,
                   artifacts=artifacts, seconds=dict(setup=round(setup_s, 3), train=round(train_s, 3),
                                                     eval=round(time.perf_counter() - t_eval, 3)))
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["RESUMABLE_KEYS", "check_resume_config", "prepare_run", "train"]
