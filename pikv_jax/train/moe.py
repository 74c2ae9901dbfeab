"""PiKVMoE distillation: a narrower sparse MoE learns a teacher's feed-forward block, and the seed's
`distillation_step`.

Task (`task: moe`): the teacher is the frozen base model's MLP at `moe.teacher_layer`; h_in is its
input (after post_attention_layernorm) and h_out = mlp(h_in), both [B, T, H_t] from the full-cache
forward. The student is `PiKVMoE(hidden_size=H_s, use_distillation=True, teacher_hidden_size=H_t)`:

    y, aux = moe.forward(teacher_proj(h_in), teacher_hidden=h_out)

and its built-in distillation loss is MSE(y, teacher_proj(h_out)): the student reproduces the
teacher's block in its own, smaller space. teacher_proj (PiKVMoE's [H_t -> H_s] projection) stays
frozen by default; trained jointly with MSE alone it would shrink both sides to zero. Loss: the hidden
strategy on (y, teacher_proj(h_out)) (relative MSE with loss.normalize) + aux_weight * router aux loss.

Seed API: `distillation_step(moe, input_data, teacher_hidden, optimizer)` is PiKV's
`PiKVMoE.distillation_step`: one optimizer step on the layer's own loss (router aux + distill_coef *
distillation), through the same jitted functional step as `pikv distill`, updating `moe` in place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pikv_jax.moe.pikv_moe import PiKVMoE
from pikv_jax.train import strategies as st
from pikv_jax.train.forward import Outputs, forward_train, stop_gradient
from pikv_jax.train.step import make_eval_step, make_train_step, split_trainable
from pikv_jax.train.task import Task, register_task


class MoEStudent(nnx.Module):
    def __init__(self, model, moe: PiKVMoE):
        self.model = model
        self.moe = moe


def moe_trainable(train_projection: bool = False, owner: str | None = None):
    """nnx filter of a PiKVMoE's trained parameters (teacher_proj only with train_projection)."""
    parts = [nnx.Param] + ([nnx.PathContains(owner)] if owner else [])
    if not train_projection:
        parts.append(nnx.Not(nnx.PathContains("teacher_proj")))
    return nnx.All(*parts)


@register_task
class MoETask(Task):
    name = "moe"

    def build(self):
        c, m = self.base.config, self.cfg.moe
        n = c.num_hidden_layers
        if not -n <= m.teacher_layer < n:
            raise ValueError(f"moe.teacher_layer={m.teacher_layer} is out of range for {n} layers")
        self.layer = m.teacher_layer % n
        moe = PiKVMoE(m.hidden_size, m.num_experts, m.top_k, rank=m.rank, alpha=m.alpha, router=m.router,
                      use_distillation=True, teacher_hidden_size=c.hidden_size, intermediate_size=m.intermediate_size,
                      capacity_factor=m.capacity_factor, dropless=m.dropless, dtype=self.dtype,
                      rngs=nnx.Rngs(self.cfg.train.seed))
        self.strategy = st.HiddenStateDistillation(normalize=self.cfg.loss.normalize)
        return MoEStudent(self.base.model, moe)

    @property
    def trainable(self):
        return moe_trainable(self.cfg.moe.train_projection, owner="moe")

    def teacher(self, model, batch):
        """(h_in, h_out) [B, T, H_t] of the teacher MLP at the configured layer."""
        out = stop_gradient(forward_train(model, batch["tokens"], batch["lengths"], mlp_layers=(self.layer,),
                                          logits_from=None, stop_after=self.layer))
        return out.mlp_in[self.layer], out.mlp_out[self.layer]

    def loss(self, module, batch, rng, *, train: bool = True):
        h_in, h_out = self.teacher(module.model, batch)
        moe = module.moe
        x = moe.teacher_proj(h_in.astype(moe.dtype))
        y, aux = moe.forward(x, training=train, key=rng if train else None, teacher_hidden=h_out)
        target = moe.teacher_proj(h_out.astype(moe.dtype))
        valid = (jnp.arange(batch["tokens"].shape[1])[None, :] < batch["lengths"][:, None]).astype(jnp.float32)
        distill, _ = self.strategy.compute_loss(Outputs(hidden=(y,)), Outputs(hidden=(target,)), {"mask": valid})
        router = aux.stats["router_aux_loss"]
        metrics = dict(distill=distill, moe_distill_loss=aux.stats["distill_loss"], router_aux_loss=router,
                       drop_rate=aux.stats["drop_rate"], router_entropy=aux.stats["router_entropy"])
        return distill + self.cfg.moe.aux_weight * router, metrics

    def describe(self) -> dict:
        m = self.cfg.moe
        return dict(super().describe(), student_hidden=m.hidden_size, teacher_hidden=self.base.config.hidden_size,
                    num_experts=m.num_experts, top_k=m.top_k, teacher_layer=self.layer)


# ---------------------------------------------------------------------------------------------- seed API


class SeedOptimizer:
    """The optimizer of the seed's `distillation_step(..., optimizer)`: an optax transformation and its
    state for one module's trained parameters (everything but teacher_proj by default).

    tx: an optax GradientTransformation (default adamw(lr)); key: PRNG key for router noise, split per step.
    """

    def __init__(self, module: PiKVMoE, tx: optax.GradientTransformation | None = None, *, lr: float = 1e-3,
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


def seed_loss(moe: PiKVMoE, batch, rng):
    """The layer's own training loss: router aux + distill_coef * MSE(y, teacher_proj(teacher_hidden))."""
    _, aux = moe.forward(batch["x"], training=True, key=rng, teacher_hidden=batch["teacher_hidden"])
    return aux.loss, {"distill_loss": aux.stats["distill_loss"], "router_aux_loss": aux.stats["router_aux_loss"],
                      "drop_rate": aux.stats["drop_rate"]}


def distillation_step(moe: PiKVMoE, input_data, teacher_hidden, optimizer: SeedOptimizer | None = None,
                      *, key=None) -> dict[str, float]:
    """One distillation step of a `PiKVMoE(use_distillation=True)` (PiKV's `model.distillation_step`).

    input_data: [..., hidden_size] student-space inputs; teacher_hidden: [..., teacher_hidden_size].
    With an optimizer the trained parameters of `moe` are updated in place; without one only the
    losses are computed. Returns host floats: loss, distill_loss, router_aux_loss, drop_rate (and
    grad_norm when updating).
    """
    if not isinstance(moe, PiKVMoE):
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


__all__ = ["MoEStudent", "MoETask", "SeedOptimizer", "distillation_step", "moe_trainable", "seed_loss"]
