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

The seed's `PiKVMoE.distillation_step` is in pikv_jax/moe/distill.py (same functional step).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pikv_jax.moe.distill import moe_trainable
from pikv_jax.moe.pikv_moe import PiKVMoE
from pikv_jax.train import strategies as st
from pikv_jax.train.forward import Outputs, forward_train, stop_gradient
from pikv_jax.train.task import Task, register_task


class MoEStudent(nnx.Module):
    def __init__(self, model, moe: PiKVMoE):
        self.model = model
        self.moe = moe


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


__all__ = ["MoEStudent", "MoETask"]
