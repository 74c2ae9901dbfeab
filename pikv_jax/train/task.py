"""A distillation task: the student module, what is trained, the loss, the data and the evaluation.

Tasks (one file each): `lora` (LoRACompressor: keys/values through rank-r codes, pikv_jax/train/lora.py),
`duo` (DuoAttention gates, pikv_jax/train/duo.py), `moe` (a smaller PiKVMoE matching a teacher MLP,
pikv_jax/train/moe.py). The trainer (pikv_jax/train/trainer.py) only sees this interface:

    module       nnx.Module holding the frozen base model and the student's parameters
    trainable    nnx filter selecting the trained parameters
    loss(module, batch, rng) -> (loss, metrics)        pure; traced in the jitted step
    project(params) -> params                         constraint after each update (default: none)
    batches      pikv_jax.train.data.Batches (batch(step), heldout(n))
    evaluate(...) -> dict                              held-out evaluation (eval.json)
    export(...) -> dict                                artifacts written to the run directory
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
from flax import nnx

from pikv_jax.api import PiKVModel, parse_dtype
from pikv_jax.config import tiny_config
from pikv_jax.train.config import DistillConfig
from pikv_jax.train.data import Batches, make_batches
from pikv_jax.trainstep import make_eval_step


def load_base_model(cfg: DistillConfig) -> PiKVModel:
    """The frozen base model (teacher) of a config: "tiny" or anything `PiKVModel.from_pretrained` takes."""
    m = cfg.model
    if m.name == "tiny":
        try:
            mc = tiny_config(**m.tiny)
        except TypeError as e:
            raise ValueError(f"model.tiny has an unknown ModelConfig field: {e}") from None
        return PiKVModel.from_config(mc, seed=m.seed, dtype=m.dtype, name="tiny")
    if m.tiny:
        raise ValueError("model.tiny overrides only apply to model.name=tiny")
    return PiKVModel.from_pretrained(m.name, dtype=m.dtype, seed=m.seed)


class Task(abc.ABC):
    """See the module docstring."""

    name: ClassVar[str] = "task"

    def __init__(self, cfg: DistillConfig, base: PiKVModel | None = None):
        self.cfg = cfg
        self.base = base if base is not None else load_base_model(cfg)
        self.dtype = parse_dtype(cfg.model.dtype)
        self.batches: Batches = make_batches(cfg.data, task=self.name, seed=cfg.train.seed,
                                             vocab_size=self.base.config.vocab_size, tokenizer=self.base.tokenizer)
        self.module: nnx.Module = self.build()

    @abc.abstractmethod
    def build(self) -> nnx.Module:
        """The module holding the base model and the student parameters, initialised."""

    @property
    @abc.abstractmethod
    def trainable(self) -> Any:
        """nnx filter of the trained parameters."""

    @abc.abstractmethod
    def loss(self, module, batch, rng, *, train: bool = True):
        """-> (loss f32[], metrics dict of f32[])."""

    def project(self, params: dict) -> dict:
        return params

    def evaluate(self, sp, initial: dict, final: dict, heldout: list[dict], place) -> dict:
        """Held-out loss of the initial and the trained parameters (tasks add their own metrics)."""
        fn = make_eval_step(sp, lambda m, b, r: self.loss(m, b, r, train=False))
        frozen = place(sp.frozen, replicate=True)
        out = {}
        for tag, params in (("initial", initial), ("final", final)):
            p = place(params, replicate=True)
            sums: dict[str, float] = {}
            for i, b in enumerate(heldout):
                loss, metrics = fn(p, frozen, place(b), jax.random.key(i))
                for k, v in dict(metrics, loss=loss).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            out[tag] = {k: v / len(heldout) for k, v in sums.items()}
        return out

    def export(self, module, run_dir) -> dict:
        return {}

    def describe(self) -> dict:
        """A few facts for logs and eval.json."""
        c = self.base.config
        return dict(task=self.name, model=self.cfg.model.name, num_layers=c.num_hidden_layers,
                    num_kv_heads=c.num_key_value_heads, head_dim=c.dim_per_head, data=self.batches.source)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def build_task(cfg: DistillConfig, base: PiKVModel | None = None) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task](cfg, base)


__all__ = ["TASKS", "Task", "build_task", "load_base_model", "register_task"]
