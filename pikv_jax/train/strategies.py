"""Distillation strategies: what the student is pulled towards, given both models' outputs.

A strategy is a frozen dataclass whose arguments are validated when it is built; its
`compute_loss(student, teacher, batch) -> (loss f32[], metrics dict[str, f32[]])` is a pure function
traced inside the jitted train step. `student` and `teacher` are `Outputs` of the same batch (see
pikv_jax/train/forward.py); `batch["mask"]` f32[B, T] says which positions are scored and
`batch["labels"]` i32[B, T] holds the next token of each position (hard-label loss).

- LogitDistillation: T^2 * KL(teacher_T || student_T) of the temperature-softened next-token
  distributions (Hinton et al. 2015; the T^2 keeps gradient scales comparable across T), mixed with
  the hard-label cross entropy: alpha * T^2 KL + (1 - alpha) CE.
- HiddenStateDistillation: MSE between residual streams after the chosen decoder layers.
- AttentionOutputDistillation: MSE between attention outputs (before o_proj) of the chosen layers.
- Combined: a weighted sum, metrics prefixed by each strategy's name.

Averages are over scored positions (and features); a batch with no scored position gives 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp

Metrics = dict


def _masked_mean(x, mask):
    """Mean of x[B, T] over positions where mask[B, T] > 0 (0 when none is)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _mask_for(batch, shape_bt, offset: int = 0):
    """batch["mask"] aligned with outputs that start at position `offset` (ones when absent)."""
    mask = batch.get("mask") if hasattr(batch, "get") else None
    if mask is None:
        return jnp.ones(shape_bt, jnp.float32)
    mask = mask[:, offset:]
    if mask.shape != tuple(shape_bt):
        raise ValueError(f"batch['mask'] has shape {tuple(batch['mask'].shape)}; expected [B, T] matching outputs "
                         f"{tuple(shape_bt)} from position {offset}")
    return mask.astype(jnp.float32)


def _check_layers(layers, name: str) -> tuple[int, ...]:
    layers = tuple(layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{name} must be integers (layer indices, negative from the end), got {layers!r}")
    return layers or (-1,)


def _pick(seq: Sequence, layers: tuple[int, ...], what: str, who: str):
    if not seq:
        raise ValueError(f"{what} distillation needs {who}.{what} outputs: the forward did not collect them")
    n = len(seq)
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"{what}_layers index {i} is out of range for {n} collected layers")
        out.append(seq[i])
    return out


class Strategy:
    """Base class: subclasses are frozen dataclasses with a `name` and `compute_loss`."""

    name: ClassVar[str] = "strategy"

    def compute_loss(self, student, teacher, batch) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitDistillation(Strategy):
    """alpha * T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, labels).

    temperature T > 0 (finite); alpha in [0, 1] (1 = pure distillation, no labels needed).
    """

    name: ClassVar[str] = "logit"
    temperature: float = 1.0
    alpha: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] (weight of the KL term; 1 - alpha weighs the hard-label "
                             f"cross entropy), got {self.alpha!r}")

    def compute_loss(self, student, teacher, batch):
        s, t = student.logits, teacher.logits
        if s is None or t is None:
            raise ValueError("logit distillation needs logits from both the student and the teacher")
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
        if student.logits_from != teacher.logits_from:
            raise ValueError("student and teacher logits start at different positions")
        off = student.logits_from
        mask = _mask_for(batch, s.shape[:2], off)
        temp = float(self.temperature)
        log_ps = jax.nn.log_softmax(s.astype(jnp.float32) / temp, axis=-1)
        log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(t).astype(jnp.float32) / temp, axis=-1)
        kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [B, T]
        kl = _masked_mean(kl, mask) * temp ** 2
        metrics = {"kl": kl}
        loss = self.alpha * kl
        if self.alpha < 1.0:
            if "labels" not in batch:
                raise ValueError("alpha < 1 mixes in the hard-label loss: the batch needs 'labels'")
            labels = batch["labels"][:, off:]
            logp = jax.nn.log_softmax(s.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
            ce = _masked_mean(nll, mask)
            metrics["ce"] = ce
            loss = loss + (1.0 - self.alpha) * ce
        return loss, metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FeatureMSE(Strategy):
    """MSE of per-layer features [B, T, ...] over scored positions and feature entries, averaged over
    `layers` (indices into the collected layers, negative from the end; empty = the last one).
    normalize: divide each layer's MSE by the teacher's mean square there (a relative error)."""

    field: ClassVar[str] = ""
    layers: tuple[int, ...] = ()
    normalize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers, f"{self.name} layers"))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")

    def compute_loss(self, student, teacher, batch):
        ss = _pick(getattr(student, self.field), self.layers, self.field, "student")
        ts = _pick(getattr(teacher, self.field), self.layers, self.field, "teacher")
        losses = []
        for s, t in zip(ss, ts):
            if s.shape != t.shape:
                raise ValueError(f"student {self.field} {tuple(s.shape)} and teacher {tuple(t.shape)} differ in shape; "
                                 "project one side first (e.g. PiKVMoE's teacher_proj)")
            mask = _mask_for(batch, s.shape[:2])
            t = jax.lax.stop_gradient(t).astype(jnp.float32)
            err = jnp.square(s.astype(jnp.float32) - t).reshape(s.shape[:2] + (-1,)).mean(-1)
            mse = _masked_mean(err, mask)
            if self.normalize:
                mse = mse / jnp.maximum(_masked_mean(jnp.square(t).reshape(t.shape[:2] + (-1,)).mean(-1), mask), 1e-12)
            losses.append(mse)
        loss = jnp.mean(jnp.stack(losses))
        return loss, {"mse": loss}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiddenStateDistillation(_FeatureMSE):
    name: ClassVar[str] = "hidden"
    field: ClassVar[str] = "hidden"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOutputDistillation(_FeatureMSE):
    name: ClassVar[str] = "attention"
    field: ClassVar[str] = "attn"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Combined(Strategy):
    """sum_i weight_i * loss_i over (weight, strategy) pairs; weights >= 0, at least one > 0."""

    name: ClassVar[str] = "combined"
    terms: tuple[tuple[float, Strategy], ...]

    def __post_init__(self):
        terms = tuple((float(w), s) for w, s in self.terms)
        if not terms:
            raise ValueError("Combined needs at least one (weight, strategy) term")
        for w, s in terms:
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"strategy weights must be finite and >= 0, got {w} for {s.name}")
            if not isinstance(s, Strategy):
                raise ValueError(f"terms must hold Strategy objects, got {type(s).__name__}")
        if not any(w > 0 for w, _ in terms):
            raise ValueError("every strategy weight is 0: nothing would be trained")
        names = [s.name for _, s in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names must be distinct, got {names}")
        object.__setattr__(self, "terms", terms)

    def compute_loss(self, student, teacher, batch):
        total = jnp.float32(0.0)
        metrics = {}
        for w, s in self.terms:
            if w == 0:
                continue
            loss, m = s.compute_loss(student, teacher, batch)
            total = total + w * loss
            metrics[s.name] = loss
            metrics.update({f"{s.name}_{k}": v for k, v in m.items() if k not in ("mse",)})
        return total, metrics


def from_loss_config(loss, *, default_hidden_layers=(), default_attention_layers=()) -> Combined:
    """The Combined strategy of a LossSection (pikv_jax/train/config.py)."""
    terms = []
    if loss.logit > 0:
        terms.append((loss.logit, LogitDistillation(temperature=loss.temperature, alpha=loss.alpha)))
    if loss.hidden > 0:
        terms.append((loss.hidden, HiddenStateDistillation(layers=loss.hidden_layers or default_hidden_layers,
                                                           normalize=loss.normalize)))
    if loss.attention > 0:
        terms.append((loss.attention, AttentionOutputDistillation(
            layers=loss.attention_layers or default_attention_layers, normalize=loss.normalize)))
    return Combined(terms=tuple(terms))


__all__ = ["AttentionOutputDistillation", "Combined", "HiddenStateDistillation", "LogitDistillation", "Strategy",
           "from_loss_config"]
