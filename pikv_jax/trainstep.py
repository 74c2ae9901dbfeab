"""The functional train step: optax optimizer, one jitted (and donated) update, data parallelism.

At the jit boundary the student is split once (`split_trainable`): the trainable parameters become a
flat dict {"path/to/param": array} (what the optimizer, the checkpoint and the step see), everything
else (the frozen base model, non-learned state) a second argument that is never differentiated:

    step(params, opt_state, frozen, batch, rng) -> (params, opt_state, rng, metrics)

`loss_fn(module, batch, rng) -> (loss, metrics)` receives the merged module. `project(params)` maps the
updated parameters back onto their constraint set (DuoAttention gates are clipped to [0, 1]).
params, opt_state and rng are donated. With a mesh, batches are split over its `data` axis and
parameters replicated, so gradients are averaged across devices by the compiler.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.parallel.mesh import DATA_AXIS, make_mesh

SEP = "/"


# ---------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A module split for training: graphdef, the trainable state's template and the frozen rest."""

    graphdef: Any
    template: nnx.State  # trainable state (Variables), used to rebuild it from the flat dict
    frozen: nnx.State

    def flat(self, state: nnx.State | None = None) -> dict[str, jax.Array]:
        state = self.template if state is None else state
        return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}

    def state(self, params: dict[str, jax.Array]) -> nnx.State:
        flat = []
        for p, v in nnx.to_flat_state(self.template):
            flat.append((p, v.replace(params[path_key(p)])))
        return nnx.from_flat_state(flat)

    def merge(self, params: dict[str, jax.Array], frozen=None):
        return nnx.merge(self.graphdef, self.state(params), self.frozen if frozen is None else frozen)


def path_key(path: tuple) -> str:
    return SEP.join(str(p) for p in path)


def split_trainable(module: nnx.Module, trainable) -> tuple[Split, dict[str, jax.Array]]:
    """(Split, flat trainable params). `trainable`: an nnx filter; an empty selection raises."""
    graphdef, train_state, frozen = nnx.split(module, trainable, ...)
    sp = Split(graphdef=graphdef, template=train_state, frozen=frozen)
    params = sp.flat()
    if not params:
        raise ValueError("the trainable filter selects no parameters: nothing to train")
    return sp, params


def count_params(params: dict) -> int:
    return int(sum(np.prod(np.shape(v)) for v in params.values()))


# ---------------------------------------------------------------------------------------------- optimizer


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then constant, cosine or linear decay to lr * min_lr_ratio."""
    lr, warm = optim.lr, min(optim.warmup_steps, total_steps)
    end = lr * optim.min_lr_ratio
    decay = max(total_steps - warm, 1)
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay, alpha=optim.min_lr_ratio)
    else:
        main = optax.linear_schedule(lr, end, decay)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) of an OptimSection."""
    sched = make_schedule(optim, total_steps)
    if optim.name == "adamw":
        tx = optax.adamw(sched, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    elif optim.name == "adam":
        tx = optax.adam(sched, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    else:
        tx = optax.sgd(sched, momentum=optim.b1 if optim.b1 > 0 else None)
    if optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    return tx, sched


# ---------------------------------------------------------------------------------------------- step


def make_train_step(sp: Split, loss_fn: Callable, tx: optax.GradientTransformation, *,
                    project: Callable | None = None, donate: bool = True):
    """The jitted step (see the module docstring). Metrics gain `loss` and `grad_norm`."""

    def step(params, opt_state, frozen, batch, rng):
        rng, sub = jax.random.split(rng)

        def objective(p):
            return loss_fn(sp.merge(p, frozen), batch, sub)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if project is not None:
            params = project(params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return params, opt_state, rng, metrics

    return jax.jit(step, donate_argnums=(0, 1, 4) if donate else ())


def make_eval_step(sp: Split, loss_fn: Callable):
    """jitted (params, frozen, batch, rng) -> (loss, metrics), no update."""

    def run(params, frozen, batch, rng):
        return loss_fn(sp.merge(params, frozen), batch, rng)

    return jax.jit(run)


# ---------------------------------------------------------------------------------------------- data parallel


def data_mesh(num: int = 0) -> Mesh | None:
    """A 1-D mesh over `num` devices (0 = all) on the `data` axis, or None for a single device."""
    n = jax.device_count() if num == 0 else num
    if n > jax.device_count():
        raise ValueError(f"mesh.data={num} needs {num} devices, {jax.device_count()} available (on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)")
    if n <= 1:
        return None
    return make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n])


def replicate(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh: Mesh | None) -> dict:
    """Places a host batch: split along the batch axis over `data` (which must divide it)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    n = mesh.shape[DATA_AXIS]
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % n:
            raise ValueError(f"batch size {v.shape[0]} is not divisible by the {n} devices of the data mesh; "
                             f"set data.batch_size (and eval.batch_size) to a multiple of {n} or mesh.data")
        sharding = NamedSharding(mesh, P(DATA_AXIS, *([None] * (v.ndim - 1))))
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


__all__ = ["Split", "count_params", "data_mesh", "make_eval_step", "make_optimizer", "make_schedule",
           "make_train_step", "path_key", "replicate", "shard_batch", "split_trainable"]
