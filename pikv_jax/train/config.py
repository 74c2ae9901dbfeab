"""Distillation run configuration: frozen kw_only dataclasses loaded from YAML, with dotted overrides.

    cfg = load_config("configs/distill_lora.yaml", ["train.steps=200", "optim.lr=1e-3"])

A YAML file holds one mapping whose top-level keys are the sections below (any may be omitted; the
defaults apply). Every value is type checked against the field's annotation and an unknown key is an
error that names it and lists the allowed ones, so a typo never silently falls back to a default.
Overrides are `section.field=value` (YAML syntax for the value: `data.text_files=[a.txt,b.txt]`,
`loss.hidden_layers=[-1]`, `duo.threshold=null`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

TASKS = ("lora", "duo", "moe")
DATA_SOURCES = ("auto", "text", "random", "passkey")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
GATES = ("clip", "sigmoid")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The frozen base model (the teacher runs it with a full cache).

    name: "tiny" (pikv_jax.config.tiny_config with `tiny` overrides, random weights from `seed`), a
      bundled name (smollm2), a GGUF file, a Hugging Face folder, or random:<preset>.
    """

    name: str = "tiny"
    dtype: str = "float32"
    seed: int = 0
    tiny: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check(self.dtype in ("float32", "bfloat16"), f"model.dtype={self.dtype!r}; allowed: float32, bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training and held-out batches, a pure function of (seed, step) (see pikv_jax/train/data.py).

    source: text (windows of `text_files`, the last `heldout_fraction` of each held out), random
      (uniform token ids), passkey (synthetic passkey contexts), auto (lora/moe: text, duo: passkey).
    prefix_len: leading tokens the student sees exactly (the prefill of a compressed cache is exact);
      only positions >= prefix_len are compressed and scored (lora), 0 = every position.
    """

    source: str = "auto"
    seq_len: int = 128
    batch_size: int = 4
    prefix_len: int = 0
    text_files: tuple[str, ...] = ("haystack_varied.txt",)
    heldout_fraction: float = 0.35
    haystacks: tuple[str, ...] = ("repetitive", "varied")
    key_len: int = 8

    def __post_init__(self):
        _check(self.source in DATA_SOURCES, f"data.source={self.source!r}; allowed: {', '.join(DATA_SOURCES)}")
        _check(self.seq_len >= 8, f"data.seq_len must be >= 8, got {self.seq_len}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(0 <= self.prefix_len < self.seq_len,
               f"data.prefix_len must be in [0, seq_len={self.seq_len}), got {self.prefix_len}")
        _check(0.0 < self.heldout_fraction < 1.0,
               f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(len(self.text_files) >= 1, "data.text_files must name at least one file")
        _check(2 <= self.key_len <= self.seq_len // 4, f"data.key_len must be in [2, seq_len/4], got {self.key_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASection:
    """LoRACompressor student: keys and values of every layer pass through its rank-`rank` codes.
    init: svd (start from the SVD basis of the base model's keys/values, so step 0 = SVDCompressor)
    or random (orthonormal)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "svd"
    calib_tokens: int = 1024

    def __post_init__(self):
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(self.init in ("svd", "random"), f"lora.init={self.init!r}; allowed: svd, random")
        _check(self.calib_tokens >= 16, f"lora.calib_tokens must be >= 16, got {self.calib_tokens}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DuoSection:
    """DuoAttention gates: one alpha per (layer, KV head); attention = alpha full + (1 - alpha) streaming
    (sinks + window). l1: weight of mean(alpha) in the loss. gate: clip (alpha itself, clipped to
    [0, 1] after every update, as in the paper) or sigmoid (alpha = sigmoid(logit)). Binarisation:
    retrieval_fraction (sparsity quantile) or threshold; exactly one."""

    n_sink: int = 64
    window: int = 256
    l1: float = 0.05
    init: float = 1.0
    gate: str = "clip"
    retrieval_fraction: float | None = 0.5
    threshold: float | None = None
    pattern_file: str = "duo_pattern.json"
    random_patterns: int = 8

    def __post_init__(self):
        _check(self.n_sink >= 0, f"duo.n_sink must be >= 0, got {self.n_sink}")
        _check(self.window >= 1, f"duo.window must be >= 1, got {self.window}")
        _check(self.l1 >= 0, f"duo.l1 must be >= 0, got {self.l1}")
        _check(self.gate in GATES, f"duo.gate={self.gate!r}; allowed: {', '.join(GATES)}")
        lo, hi = (0.0, 1.0) if self.gate == "clip" else (1e-4, 1 - 1e-4)
        _check(lo <= self.init <= hi, f"duo.init must be in [{lo}, {hi}] for gate={self.gate}, got {self.init}")
        _check((self.retrieval_fraction is None) != (self.threshold is None),
               "give exactly one of duo.retrieval_fraction and duo.threshold (the other null)")
        if self.retrieval_fraction is not None:
            _check(0.0 <= self.retrieval_fraction <= 1.0,
                   f"duo.retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")
        _check(self.random_patterns >= 0, f"duo.random_patterns must be >= 0, got {self.random_patterns}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoESection:
    """PiKVMoE student of width `hidden_size` distilled from the teacher's MLP at `teacher_layer`:
    input teacher_proj(h_in), target teacher_proj(mlp(h_in)) (PiKVMoE's distillation loss), with
    teacher_proj [H_teacher -> hidden_size] frozen unless train_projection (MSE alone would then
    collapse both sides to zero)."""

    hidden_size: int = 32
    num_experts: int = 4
    top_k: int = 2
    rank: int = 4
    alpha: float = 8.0
    router: str = "base"
    intermediate_size: int | None = None
    capacity_factor: float | None = 2.0
    dropless: bool = False
    teacher_layer: int = -1
    train_projection: bool = False
    aux_weight: float = 1.0

    def __post_init__(self):
        _check(self.hidden_size >= 1, f"moe.hidden_size must be >= 1, got {self.hidden_size}")
        _check(self.num_experts >= 1, f"moe.num_experts must be >= 1, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts, f"moe.top_k must be in [1, num_experts={self.num_experts}]")
        _check(self.aux_weight >= 0, f"moe.aux_weight must be >= 0, got {self.aux_weight}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSection:
    """Weights of the strategies (pikv_jax/train/strategies.py); a weight of 0 switches one off.
    logit: temperature-squared KL (alpha) plus hard-label CE (1 - alpha). hidden / attention: MSE of
    the residual stream / attention outputs of `*_layers` (empty = the last layer), relative to the
    teacher's mean square when `normalize`."""

    logit: float = 1.0
    temperature: float = 1.0
    alpha: float = 1.0
    hidden: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    attention: float = 0.0
    attention_layers: tuple[int, ...] = ()
    normalize: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        _check(self.name in OPTIMIZERS, f"optim.name={self.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        _check(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be a finite number > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    """steps: optimizer steps in total (a resumed run continues to it). remat: recompute each decoder
    layer in the backward pass (memory for compute). step_delay_s: sleep after each step (a testing
    aid that makes a run slow enough to interrupt)."""

    steps: int = 100
    seed: int = 0
    log_every: int = 1
    remat: bool = False
    step_delay_s: float = 0.0

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.step_delay_s >= 0, f"train.step_delay_s must be >= 0, got {self.step_delay_s}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """Orbax CheckpointManager: save every `every` steps (and at the last step), keep the newest `keep`."""

    every: int = 50
    keep: int = 3

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    """Held-out evaluation at the end of training: `batches` batches of `batch_size` (default: the
    training batch size) from the held-out split; 0 batches = no evaluation."""

    batches: int = 4
    batch_size: int | None = None

    def __post_init__(self):
        _check(self.batches >= 0, f"eval.batches must be >= 0 (0 = no evaluation), got {self.batches}")
        _check(self.batch_size is None or self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Data parallelism: the batch is split over a `data` axis of `data` devices (0 = all devices;
    1 = no mesh); parameters are replicated."""

    data: int = 0

    def __post_init__(self):
        _check(self.data >= 0, f"mesh.data must be >= 0 (0 = all devices), got {self.data}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    task: str = "lora"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    duo: DuoSection = dataclasses.field(default_factory=DuoSection)
    moe: MoESection = dataclasses.field(default_factory=MoESection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def __post_init__(self):
        _check(self.task in TASKS, f"task={self.task!r}; allowed: {', '.join(TASKS)}")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------- building


def _plain(x):
    """Tuples -> lists (YAML / JSON friendly), recursively."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """`value` converted to the annotated type `tp`, or a ValueError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single element for a list field
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where} must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)  # PyYAML reads 1e-3 as a string
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise ValueError(f"{where}: unsupported field type {_type_name(tp)}")


def _unknown(key: str, allowed: Sequence[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    loc = f"{where}.{key}" if where else key
    return ValueError(f"unknown config key {loc!r}{hint}; allowed{' in ' + where if where else ''}: "
                      f"{', '.join(sorted(allowed))}")


def _build(cls, data: Mapping[str, Any], where: str = ""):
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {where or '(top level)'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(str(key), list(fields), where)
        loc = f"{where}.{key}" if where else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kw[key] = _build(tp, value or {}, loc)
        else:
            kw[key] = _coerce(value, tp, loc)
    return cls(**kw)


def config_from_dict(data: Mapping[str, Any] | None) -> DistillConfig:
    return _build(DistillConfig, data or {})


def parse_override(text: str) -> tuple[list[str], Any]:
    """"optim.lr=1e-3" -> (["optim", "lr"], 1e-3 parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ValueError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Dotted overrides applied to the raw mapping (unknown keys are caught by `config_from_dict`)."""
    data = _plain(dict(data or {}))
    for text in overrides:
        parts, value = parse_override(text)
        node, cls, where = data, DistillConfig, ""
        for i, p in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else None
            if fields is not None and p not in fields:
                raise _unknown(p, list(fields), where)
            hint = typing.get_type_hints(cls)[p] if cls is not None else None
            last = i == len(parts) - 1
            if last:
                node[p] = value
            else:
                if hint is not None and not dataclasses.is_dataclass(hint) and hint is not dict:
                    raise ValueError(f"override {text!r}: {where + '.' if where else ''}{p} is not a section")
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {text!r}: {p} is not a mapping in the config file")
                cls = hint if dataclasses.is_dataclass(hint) else None
                where = f"{where}.{p}" if where else p
    return data


def load_config(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Config from a YAML file (None = all defaults) and dotted overrides."""
    data: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: DistillConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["CheckpointSection", "DataSection", "DistillConfig", "DuoSection", "EvalSection", "LoRASection",
           "LossSection", "MeshSection", "MoESection", "ModelSection", "OptimSection", "TASKS", "TrainSection",
           "apply_overrides", "config_from_dict", "dump_config", "load_config", "parse_override"]
