"""Orbax checkpoints of a training run: atomic saves, keep-N, resume, restore into any sharding.

A checkpoint at step s holds the train state after s optimizer steps:

    {"params": {path: array}, "opt_state": optax state, "rng": u32[2] (key data), "step": i32[]}

plus a small JSON item ("meta": step, a SHA-256 digest of every array, the config). Orbax writes each
step into a temporary directory and renames it when complete, so an interrupted save never leaves a
half-written step behind; `CheckpointManager` keeps the newest `keep` steps and saves every `every`.

Restore goes through an abstract target (`jax.ShapeDtypeStruct` with a sharding per leaf), so a state
saved under one sharding (or device count) is restored directly into another. After restoring, the
digest is recomputed and compared: a checkpoint whose files are missing, truncated or overwritten
raises `CheckpointError` naming its path, it is never skipped silently.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, META = "state", "meta"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be restored (corrupt, incomplete, or another run's)."""


def state_digest(state) -> str | None:
    """SHA-256 over every leaf's path, dtype, shape and bytes (None when some array is not fully
    addressable from this process, e.g. multi-host)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def abstract_like(state, sharding_fn=None):
    """ShapeDtypeStructs of `state`, each with `sharding_fn(leaf)` or the leaf's own sharding."""

    def one(x):
        x = x if isinstance(x, jax.Array) else jax.numpy.asarray(x)
        sharding = sharding_fn(x) if sharding_fn is not None else x.sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, state)


class Checkpointer:
    """Checkpoints of one run under `directory` (see the module docstring)."""

    def __init__(self, directory, *, keep: int = 3, every: int = 1):
        self.directory = pathlib.Path(directory).absolute()
        self.keep, self.every = keep, every
        self._manager = None

    # ------------------------------------------------------------------ inspection (no orbax manager needed)

    def steps(self) -> list[int]:
        """Completed checkpoint steps on disk (orbax's temporary directories are not counted)."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            if p.is_dir() and p.name.isdigit():
                out.append(int(p.name))
        return sorted(out)

    def has_checkpoints(self) -> bool:
        return bool(self.steps())

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=self.every,
                                                   create=True, enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: dict, *, meta: dict | None = None, force: bool = False) -> bool:
        """Saves `state` at `step` when step is a multiple of `every` (or `force`). Returns whether it saved."""
        if not force and step % self.every:
            return False
        info = dict(meta or {}, step=int(step), digest=state_digest(state))
        saved = self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                                   META: ocp.args.JsonSave(info)}), force=force)
        self.manager.wait_until_finished()
        return bool(saved)

    def restore(self, target, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest) restored into the abstract `target`
        (see `abstract_like`). Raises FileNotFoundError when there is no checkpoint, CheckpointError
        when the checkpoint cannot be read or fails its digest."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint to resume from in {str(self.directory)!r}")
        step = steps[-1] if step is None else int(step)
        path = self.step_dir(step)
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not found in {str(self.directory)!r} (have {steps})")
        advice = (f"delete {str(path)!r} to resume from the previous checkpoint"
                  + (f" (step {steps[-2]})" if len(steps) > 1 and step == steps[-1] else "")
                  + ", or start a new run in another --run-dir")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                                                        META: ocp.args.JsonRestore()}))
            state, meta = out[STATE], dict(out[META] or {})
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            self.close()
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or incomplete and cannot be restored "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); {advice}") from e
        if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(target):
            raise CheckpointError(f"checkpoint {str(path)!r} holds a different state structure than this run "
                                  f"(another task or config?); {advice}")
        want = meta.get("digest")
        if want is None and "digest" not in meta:
            raise CheckpointError(f"checkpoint {str(path)!r} has no integrity record; {advice}")
        got = state_digest(state)
        if want is not None and got is not None and got != want:
            raise CheckpointError(f"checkpoint {str(path)!r} fails its integrity check (SHA-256 of the restored "
                                  f"arrays differs from the one recorded at save time); {advice}")
        if int(meta.get("step", step)) != step:
            raise CheckpointError(f"checkpoint {str(path)!r} records step {meta.get('step')}, not {step}; {advice}")
        return state, meta

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def latest_step(directory) -> int | None:
    steps = Checkpointer(directory).steps()
    return steps[-1] if steps else None


__all__ = ["CheckpointError", "Checkpointer", "abstract_like", "latest_step", "state_digest"]
