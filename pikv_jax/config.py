"""Static configuration: frozen, hashable dataclasses that may be closed over by `jax.jit`.

Array state (parameters, caches) never lives here; only shapes, constants and choices do, so
a config can be a static argument and two equal configs share one compiled function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pikv_jax.moe.routers import ROUTER_KINDS

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")  # decoders whose MLP is a sparse MoE
ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama-3.1's wavelength-dependent interpolation;
    `linear` divides every position by `factor`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; allowed: {ROPE_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling: high_freq_factor must exceed low_freq_factor for rope_type 'llama3'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder: Llama (1-3.x), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Mistral
    (optional sliding window), and the MoE variants Mixtral, Qwen2-MoE and Qwen3-MoE (every decoder
    MLP is a sparse MoE when num_experts > 0). Field names follow Hugging Face's `config.json`."""

    architecture: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: a query sees keys with pos > q_pos - window
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Mixture of experts (num_experts = 0: dense MLP). See pikv_jax/models/moe_llama.py.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # expert width (None: intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    norm_topk_prob: bool = True  # renormalise the top-k gates (Mixtral always; Qwen-MoE per config)
    router_aux_loss_coef: float = 0.001
    moe_router: str = "base"  # a pikv_jax.moe router kind (runtime choice, not stored in HF configs)
    moe_capacity_factor: float | None = None  # None: dropless (ragged_dot); else capacity dispatch

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not supported; allowed: {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
        if self.dim_per_head % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.dim_per_head}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        self._check_moe()

    def _check_moe(self):
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 = dense MLP), got {self.num_experts}")
        if self.architecture in MOE_ARCHITECTURES and self.num_experts < 1:
            raise ValueError(f"architecture={self.architecture!r} is a mixture of experts: num_experts must be >= 1")
        if self.num_experts == 0:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("shared_expert_intermediate_size must be >= 0, got "
                             f"{self.shared_expert_intermediate_size}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ValueError(f"moe_capacity_factor must be > 0 or None (dropless), got {self.moe_capacity_factor}")

        if self.moe_router not in ROUTER_KINDS:
            raise ValueError(f"moe_router={self.moe_router!r} is not a router kind; allowed: {sorted(ROUTER_KINDS)}")

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one expert's feed-forward network."""
        return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.intermediate_size

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def o_proj_bias(self) -> bool:
        """Hugging Face's Llama and Qwen3 apply `attention_bias` to o_proj as well; Qwen2 biases only
        q/k/v and Mistral has no attention biases."""
        return self.attention_bias and self.architecture in ("llama", "qwen3", "qwen3_moe")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        e, d, h, hk = self.hidden_size, self.dim_per_head, self.num_attention_heads, self.num_key_value_heads
        attn = e * d * (h + 2 * hk) + h * d * e + (d * (h + 2 * hk) if self.attention_bias else 0)
        mlp = 3 * e * self.intermediate_size
        if self.num_experts:
            shared = self.shared_expert_intermediate_size
            mlp = (self.num_experts * 3 * e * self.expert_intermediate_size + e * self.num_experts
                   + (3 * e * shared + e if shared else 0))
        per_layer = attn + mlp + 2 * e + (2 * d if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.num_hidden_layers * per_layer + self.vocab_size * e + e + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` mapping. A missing, mistyped or out-of-range
        field raises a one-line ValueError that starts with `source` (the file) and names the field."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{source}: must hold a JSON object of model settings, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "mixtral": "mixtral",
                "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}.get(model_type)
        if arch is None:
            raise ValueError(f"{source}: model_type={model_type!r} is not supported; allowed: {ARCHITECTURES}")
        f = _HFFields(cfg, source)
        rs = cfg.get("rope_scaling") or None
        if rs is not None and not isinstance(rs, Mapping):
            raise ValueError(f"{source}: field 'rope_scaling' must be an object or null, got {rs!r}")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            nested = cfg.get("rope_parameters") or {}
            rope_theta = nested.get("rope_theta") if isinstance(nested, Mapping) else None
        n_heads = f.integer("num_attention_heads")
        try:
            r = _HFFields(rs or {}, source, "rope_scaling.")
            rope_scaling = None if not rs else RopeScaling(
                rope_type=rs.get("rope_type", rs.get("type", "default")), factor=r.number("factor", 1.0),
                low_freq_factor=r.number("low_freq_factor", 1.0), high_freq_factor=r.number("high_freq_factor", 4.0),
                original_max_position_embeddings=r.integer("original_max_position_embeddings", 8192))
            return cls(
                architecture=arch,
                vocab_size=f.integer("vocab_size"),
                hidden_size=f.integer("hidden_size"),
                intermediate_size=f.integer("intermediate_size"),
                num_hidden_layers=f.integer("num_hidden_layers"),
                num_attention_heads=n_heads,
                num_key_value_heads=f.integer("num_key_value_heads", n_heads),
                head_dim=f.integer("head_dim", None),
                rope_theta=_HFFields({"rope_theta": rope_theta}, source).number("rope_theta", 10000.0),
                rope_scaling=rope_scaling,
                rms_norm_eps=f.number("rms_norm_eps", 1e-6),
                max_position_embeddings=f.integer("max_position_embeddings", 4096),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch in ("qwen2", "qwen2_moe"))),
                qk_norm=arch in ("qwen3", "qwen3_moe"),
                sliding_window=(f.integer("sliding_window", None)
                                if (arch in ("mistral", "mixtral") or cfg.get("use_sliding_window")) else None),
                bos_token_id=f.integer("bos_token_id", None),
                eos_token_id=_HFFields({"eos_token_id": eos}, source).integer("eos_token_id", None),
                **_moe_from_hf(arch, f),
            )
        except ValueError as e:  # range checks of RopeScaling / ModelConfig: say which file they came from
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of `from_hf_dict`, for writing a Hugging Face checkpoint folder."""
        model_type = self.architecture  # HF's model_type equals our architecture name
        arch_name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                     "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[self.architecture]
        d = dict(
            architectures=[arch_name], model_type=model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.dim_per_head,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            hidden_act="silu", bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None,
        )
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        d.update(_moe_to_hf(self))
        return d


class _HFFields:
    """Typed reads of a config.json mapping; errors name the file, the field and what is allowed."""

    _REQUIRED = object()

    def __init__(self, cfg: Mapping[str, Any], source: str, prefix: str = ""):
        self.cfg, self.source, self.prefix = cfg, source, prefix

    def _get(self, key: str, default, kind: str):
        value = self.cfg.get(key)
        if value is None:
            if default is self._REQUIRED:
                raise ValueError(f"{self.source}: required field {self.prefix}{key!r} is missing; expected {kind}")
            return default
        return value

    def integer(self, key: str, default=_REQUIRED) -> int | None:
        value = self._get(key, default, "an integer >= 1")
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{self.source}: field {self.prefix}{key!r} must be an integer, got {value!r}")

    def number(self, key: str, default=_REQUIRED) -> float:
        value = self._get(key, default, "a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{self.source}: field {self.prefix}{key!r} must be a number, got {value!r}")


def _moe_from_hf(arch: str, f: _HFFields) -> dict[str, Any]:
    """MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json (empty for dense models)."""
    cfg = f.cfg
    if arch == "mixtral":
        return dict(num_experts=f.integer("num_local_experts", 8),
                    num_experts_per_tok=f.integer("num_experts_per_tok", 2),
                    moe_intermediate_size=f.integer("intermediate_size"), norm_topk_prob=True,
                    router_aux_loss_coef=f.number("router_aux_loss_coef", 0.001))
    if arch in ("qwen2_moe", "qwen3_moe"):
        step = f.integer("decoder_sparse_step", 1)
        dense_layers = list(cfg.get("mlp_only_layers") or [])
        if step != 1 or dense_layers:
            raise ValueError(f"{f.source}: decoder_sparse_step={step} and mlp_only_layers={dense_layers} mix "
                             "dense and MoE layers, which is not supported; allowed: decoder_sparse_step=1, "
                             "mlp_only_layers=[]")
        return dict(num_experts=f.integer("num_experts"), num_experts_per_tok=f.integer("num_experts_per_tok", 2),
                    moe_intermediate_size=f.integer("moe_intermediate_size"),
                    shared_expert_intermediate_size=f.integer("shared_expert_intermediate_size", 0)
                    if arch == "qwen2_moe" else 0,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    router_aux_loss_coef=f.number("router_aux_loss_coef", 0.001))
    return {}


def _moe_to_hf(c: ModelConfig) -> dict[str, Any]:
    """The inverse of `_moe_from_hf`."""
    if c.architecture == "mixtral":
        return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                    intermediate_size=c.expert_intermediate_size, router_aux_loss_coef=c.router_aux_loss_coef)
    if c.architecture in ("qwen2_moe", "qwen3_moe"):
        d = dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                 moe_intermediate_size=c.expert_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                 router_aux_loss_coef=c.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[])
        if c.architecture == "qwen2_moe":
            d["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
        return d
    return {}


# Real shapes, for random-weight benchmarks and tests of loaders.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2),
    "llama3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009),
    "qwen2-0.5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True),
    "qwen3-0.6b": ModelConfig(
        architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True,
        qk_norm=True),
    "mistral-7b": ModelConfig(
        architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
        rms_norm_eps=1e-5, max_position_embeddings=32768),
    # Mixture-of-experts decoders (pikv_jax/models/moe_llama.py).
    "mixtral-8x7b": ModelConfig(
        architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
        rms_norm_eps=1e-5, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336, router_aux_loss_coef=0.02),
    "mixtral-tiny": ModelConfig(
        architecture="mixtral", vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512, eos_token_id=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, router_aux_loss_coef=0.02),
    "qwen2moe-tiny": ModelConfig(
        architecture="qwen2_moe", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=512, attention_bias=True, eos_token_id=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False),
    "qwen3moe-tiny": ModelConfig(
        architecture="qwen3_moe", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=512, qk_norm=True, eos_token_id=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    """A few-layer config for fast tests of every code path."""
    base = dict(architecture=architecture, vocab_size=97, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
                attention_bias=architecture == "qwen2", qk_norm=architecture == "qwen3", eos_token_id=2)
    base.update(overrides)
    return ModelConfig(**base)

