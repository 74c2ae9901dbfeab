"""The seed's `PiKVMoE.distillation_step(input_data, teacher_hidden, optimizer)`: one optimizer step
on the layer's own loss (router aux + distill_coef * MSE to the projected teacher), through the
same jitted functional step as `pikv distill` (pikv_jax/trainstep.py), updating the layer in place.
`pikv distill --task moe` (pikv_jax/train/moe.py) trains the same layer against a real model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pikv_jax.trainstep import make_eval_step, make_train_step, split_trainable


def moe_trainable(train_projection: bool = False, owner: str | None = None):
    """nnx filter of a PiKVMoE's trained parameters (teacher_proj only with train_projection)."""
    parts = [nnx.Param] + ([nnx.PathContains(owner)] if owner else [])
    if not train_projection:
        parts.append(nnx.Not(nnx.PathContains("teacher_proj")))
    return nnx.All(*parts)


class SeedOptimizer:
    """The optimizer of the seed's `distillation_step(..., optimizer)`: an optax transformation and its
    state for one module's trained parameters (everything but teacher_proj by default).

    tx: an optax GradientTransformation (default adamw(lr)); key: PRNG key for router noise, split per step.
    """

    def __init__(self, module: nnx.Module, tx: optax.GradientTransformation | None = None, *, lr: float = 1e-3,
                 train_projection: bool = False, seed: int = 0):
        self.tx = tx if tx is not None else optax.adamw(lr)
        self.filter = moe_trainable(train_projection)
        sp, params = split_trainable(module, self.filter)
        self.opt_state = self.tx.init(params)
        self.rng = jax.random.PRNGKey(seed)
        self.steps = 0
        self._compiled: dict[Any, Any] = {}

    def step_fn(self, sp):
        """The jitted step for this module's structure (compiled once per graphdef)."""
        try:
            key = hash(sp.graphdef) and sp.graphdef
        except TypeError:  # an unhashable static attribute: compile per call
            key = object()
        if key not in self._compiled:
            self._compiled.clear()
            self._compiled[key] = make_train_step(sp, seed_loss, self.tx, donate=False)
        return self._compiled[key]


def seed_loss(moe: nnx.Module, batch, rng):
    """The layer's own training loss: router aux + distill_coef * MSE(y, teacher_proj(teacher_hidden))."""
    _, aux = moe.forward(batch["x"], training=True, key=rng, teacher_hidden=batch["teacher_hidden"])
    return aux.loss, {"distill_loss": aux.stats["distill_loss"], "router_aux_loss": aux.stats["router_aux_loss"],
                      "drop_rate": aux.stats["drop_rate"]}


def distillation_step(moe: nnx.Module, input_data, teacher_hidden, optimizer: SeedOptimizer | None = None,
                      *, key=None) -> dict[str, float]:
    """One distillation step of a `PiKVMoE(use_distillation=True)` (PiKV's `model.distillation_step`).

    input_data: [..., hidden_size] student-space inputs; teacher_hidden: [..., teacher_hidden_size].
    With an optimizer the trained parameters of `moe` are updated in place; without one only the
    losses are computed. Returns host floats: loss, distill_loss, router_aux_loss, drop_rate (and
    grad_norm when updating).
    """
    if not hasattr(moe, "use_distillation"):  # duck-typed: pikv_moe.py imports this module
        raise ValueError(f"distillation_step needs a PiKVMoE, got {type(moe).__name__}")
    if not moe.use_distillation:
        raise ValueError("distillation_step needs PiKVMoE(use_distillation=True, teacher_hidden_size=...)")
    batch = {"x": jnp.asarray(input_data), "teacher_hidden": jnp.asarray(teacher_hidden)}
    flt = optimizer.filter if optimizer is not None else moe_trainable()
    sp, params = split_trainable(moe, flt)
    if optimizer is None:
        loss, metrics = make_eval_step(sp, seed_loss)(params, sp.frozen, batch,
                                                      key if key is not None else jax.random.PRNGKey(0))
        return {k: float(v) for k, v in dict(metrics, loss=loss).items()}
    if key is not None:
        optimizer.rng = key
    params, optimizer.opt_state, optimizer.rng, metrics = optimizer.step_fn(sp)(
        params, optimizer.opt_state, sp.frozen, batch, optimizer.rng)
    nnx.update(moe, sp.state(params))
    optimizer.steps += 1
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


__all__ = ["SeedOptimizer", "distillation_step", "moe_trainable", "seed_loss"]
