"""Shared pieces of the distillation tests: tiny configs, running `pikv distill` in a subprocess,
reading a run's checkpointed parameters, corrupting a checkpoint, a model with planted retrieval heads."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# tiny-model versions of the shipped configs (2 layers, vocab 97, char-level text)
TINY_LORA = ["model.name=tiny", "data.seq_len=48", "data.prefix_len=16", "data.batch_size=2", "lora.rank=4",
             "lora.calib_tokens=64", "eval.batches=2", "optim.lr=3e-3", "optim.warmup_steps=0"]
TINY_DUO = ["model.name=tiny", "data.seq_len=64", "data.batch_size=2", "duo.n_sink=4", "duo.window=16",
            "duo.random_patterns=3", "eval.batches=2", "train.remat=false"]
TINY_MOE = ["model.name=tiny", "data.seq_len=32", "data.batch_size=4", "eval.batches=2"]


def cli_env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def distill_cmd(*args) -> list[str]:
    """`python -m pikv_jax.train.cli ARGS` (the `pikv distill` command)."""
    return [sys.executable, "-m", "pikv_jax.train.cli", "--no-progress", *map(str, args)]


def run_distill(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(distill_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(**env),
                          cwd=ROOT)


def checkpoint_state(run_dir, step: int | None = None) -> dict:
    """Host copy of a run's checkpointed train state (latest step by default)."""
    import orbax.checkpoint as ocp

    from pikv_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(pathlib.Path(run_dir) / "checkpoints")
    steps = ck.steps()
    assert steps, f"no checkpoint in {run_dir}"
    with ocp.CheckpointManager(ck.directory) as mgr:
        out = mgr.restore(steps[-1] if step is None else step,
                          args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    return jax.tree.map(np.asarray, out["state"])


def array_files(step_dir) -> list[str]:
    """The array data files of a checkpoint step (OCDBT data blobs), largest first."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.path.basename(r) == "d"]
    return sorted(files, key=os.path.getsize, reverse=True)


def garble(path) -> None:
    size = os.path.getsize(path)
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        f.write(rng.integers(0, 256, max(size, 16), dtype=np.uint8).tobytes())


def planted_model(cfg, heads, *, seed: int = 0, qk_scale: float = 3.0, v_scale: float = 0.02):
    """A random model whose KV heads in `heads` ({(layer, head)}) are sharp content-based retrieval
    heads (q/k scaled up) while every other KV head barely contributes (v scaled down): the heads a
    DuoAttention pattern must keep full are known."""
    from pikv_jax.api import PiKVModel

    base = PiKVModel.from_config(cfg, seed=seed)
    d, g = cfg.dim_per_head, cfg.group_size
    for li, layer in enumerate(base.model.layers):
        at = layer.self_attn
        for h in range(cfg.num_key_value_heads):
            kv = slice(h * d, (h + 1) * d)
            if (li, h) in heads:
                at.k_proj.kernel[...] = at.k_proj.kernel[...].at[:, kv].multiply(qk_scale)
                at.q_proj.kernel[...] = at.q_proj.kernel[...].at[:, h * g * d:(h + 1) * g * d].multiply(qk_scale)
            else:
                at.v_proj.kernel[...] = at.v_proj.kernel[...].at[:, kv].multiply(v_scale)
    return PiKVModel(base.model, None, cfg, name="planted")
