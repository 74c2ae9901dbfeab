"""Resume and checkpoint errors of `pikv distill`.

- A run SIGKILLed mid-training (after at least one checkpoint) and resumed ends with bitwise the same
  parameters, optimizer state and per-step losses as an uninterrupted run (CPU, fixed seed).
- --resume without a checkpoint, --no-resume over existing checkpoints, a changed config and a corrupt
  checkpoint all raise errors naming the path; training never restarts silently from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from distill_helpers import CONFIGS, TINY_LORA, array_files, checkpoint_state, cli_env, distill_cmd, garble, run_distill

from pikv_jax.train.checkpoint import CheckpointError
from pikv_jax.train.cli import main as distill_main
from pikv_jax.train.config import load_config
from pikv_jax.train.trainer import train

LORA = str(CONFIGS / "distill_lora.yaml")
STEPS = 12


def _metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    common = ["--config", LORA, *TINY_LORA, f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.keep=2"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    # a persistent compilation cache shared by the three processes: the resumed run skips compiling
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env = cli_env(**cache)
    ref = subprocess.Popen(distill_cmd(*common, "--run-dir", ref_dir), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(distill_cmd(*common, "train.step_delay_s=0.4", "--run-dir", run_dir), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    deadline = time.time() + 400
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        steps = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit()) if ckpts.is_dir() else []
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if steps and logged >= steps[-1] + 1:  # past a checkpoint, mid-way to the next one
            victim.send_signal(signal.SIGKILL)
            killed_at = (steps, logged)
            break
        time.sleep(0.05)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at is not None and killed_at[0][-1] < STEPS
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]

    resumed = run_distill(*common, "--resume", "--run-dir", run_dir, **cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == max(s for s in killed_at[0]) and summary["resumed_from"] < STEPS

    a, b = checkpoint_state(ref_dir), checkpoint_state(run_dir)
    assert int(a["step"]) == int(b["step"]) == STEPS
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:  # params, optimizer moments and count, PRNG key: bitwise
        assert flat_a[k].dtype == flat_b[k].dtype and np.array_equal(flat_a[k], flat_b[k]), k
    assert _metrics(ref_dir) == _metrics(run_dir)  # each step logged once, identical losses
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, STEPS + 1))
    ea, eb = (json.loads((d / "eval.json").read_text())["heldout"] for d in (ref_dir, run_dir))
    assert ea == eb


def _flat(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = np.asarray(tree)
    return out


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny LoRA run of 4 steps with checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(LORA, [*TINY_LORA, *FAST, "train.steps=4", "checkpoint.every=2"])
    train(cfg, run_dir, progress=False)
    return cfg, run_dir


FAST = ["lora.init=random", "eval.batches=1"]


def test_resume_without_checkpoint_names_the_directory(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    cfg = load_config(LORA, [*TINY_LORA, "train.steps=2"])
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from in .*nothing-here"):
        train(cfg, missing, resume=True, progress=False)
    assert distill_main(["--config", LORA, *TINY_LORA, "--resume", "--run-dir", str(missing)]) == 2
    assert "nothing-here" in capsys.readouterr().err


def test_no_resume_refuses_existing_checkpoints(finished_run):
    cfg, run_dir = finished_run
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, run_dir, resume=False, progress=False)


def test_resume_with_a_changed_config_is_refused(finished_run):
    cfg, run_dir = finished_run
    changed = load_config(LORA, [*TINY_LORA, *FAST, "train.steps=4", "checkpoint.every=2", "optim.lr=0.5"])
    with pytest.raises(ValueError, match="different config.*optim.lr"):
        train(changed, run_dir, progress=False)


def test_resume_of_a_complete_run_restores_instead_of_restarting(finished_run, tmp_path):
    cfg, run_dir = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    summary = train(cfg, copy, progress=False)  # default policy: resume (nothing left to train)
    assert summary["resumed_from"] == 4


@pytest.mark.filterwarnings("ignore:coroutine:RuntimeWarning")  # orbax's reader after a failed restore
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["garbage", "truncate", "delete", "digest"])
def test_corrupt_checkpoint_raises_naming_its_path(finished_run, tmp_path, capsys, how):
    _, src = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    step_dir = run_dir / "checkpoints" / "4"
    for victim in array_files(step_dir):  # every array data file of the newest checkpoint
        if how == "garbage":
            garble(victim)
        elif how == "truncate":
            with open(victim, "r+b") as f:
                f.truncate(max(os.path.getsize(victim) // 3, 1))
        elif how == "delete":
            os.remove(victim)
    if how == "digest":  # readable arrays whose bytes differ from the ones saved
        meta = step_dir / "meta" / "metadata"
        meta.write_text(meta.read_text().replace(json.loads(meta.read_text())["digest"], "0" * 64))
    longer = [*TINY_LORA, *FAST, "train.steps=6", "checkpoint.every=2"]
    with pytest.raises(CheckpointError, match=f"checkpoint '{step_dir}' .*delete .* previous checkpoint .step 2."):
        train(load_config(LORA, longer), run_dir, progress=False)
    assert distill_main(["--config", LORA, *longer, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(step_dir) in err and ("corrupt" in err or "integrity" in err)
    assert not (run_dir / "checkpoints" / "6").exists()  # nothing trained from scratch
