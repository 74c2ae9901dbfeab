"""Distillation training (optax, orbax): learned LoRA compressors, DuoAttention gates and PiKVMoE students
against a full-cache teacher. `pikv distill --config configs/distill_*.yaml` runs `train`.

Modules: config (YAML + dotted overrides), strategies (logit / hidden-state / attention-output losses),
forward (instrumented uncached forward), data (deterministic batches), checkpoint (orbax), task +
lora / duo / moe (the students), trainer (the loop), cli. The optimizer, jitted step and data
parallelism are in pikv_jax/trainstep.py (the MoE layer's seed `distillation_step` uses them too).
"""

from pikv_jax.moe.distill import SeedOptimizer, distillation_step
from pikv_jax.train import duo, lora, moe  # noqa: F401 - each registers its task
from pikv_jax.train.checkpoint import Checkpointer, CheckpointError
from pikv_jax.train.config import DistillConfig, load_config
from pikv_jax.train.strategies import (
                                       AttentionOutputDistillation,
                                       Combined,
                                       HiddenStateDistillation,
                                       LogitDistillation,
                                       Strategy,
)
from pikv_jax.train.task import build_task
from pikv_jax.train.trainer import train

__all__ = ["AttentionOutputDistillation", "CheckpointError", "Checkpointer", "Combined", "DistillConfig",
           "HiddenStateDistillation", "LogitDistillation", "SeedOptimizer", "Strategy", "build_task",
           "distillation_step", "load_config", "train"]
