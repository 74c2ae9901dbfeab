"""Static configuration: validation with errors that name the argument, Hugging Face config.json
mapping per architecture, and parameter counts against published model sizes."""

from __future__ import annotations

import pytest
from flax import nnx

from pikv_jax.config import PRESETS, ModelConfig, RopeScaling, preset, tiny_config
from pikv_jax.models.weights import abstract_model


def test_configs_are_hashable_static_values():
    a, b = tiny_config("qwen3"), tiny_config("qwen3")
    assert a == b and hash(a) == hash(b)
    assert a.replace(num_hidden_layers=3) != a
    with pytest.raises(Exception):
        a.vocab_size = 5  # frozen


@pytest.mark.parametrize("changes,named", [
    (dict(architecture="gpt2"), "architecture"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_size=66, head_dim=None), "hidden_size"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_invalid_model_config_names_the_argument(changes, named):
    with pytest.raises(ValueError, match=named):
        tiny_config().replace(**changes)


@pytest.mark.parametrize("kwargs,named", [
    (dict(rope_type="yarn"), "rope_type"),
    (dict(rope_type="linear", factor=0.0), "factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
])
def test_invalid_rope_scaling_names_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        RopeScaling(**kwargs)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match="gpt-j"):
        preset("gpt-j")


# Hugging Face config.json files, abridged to the fields the model needs, as published.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}
QWEN2_05B = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24, "eos_token_id": 151643,
}
QWEN3_06B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rope_theta": 1000000, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "attention_bias": False, "sliding_window": None, "use_sliding_window": False,
}
MISTRAL_7B_V01 = {
    "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05, "max_position_embeddings": 32768, "sliding_window": 4096,
    "tie_word_embeddings": False,
}


def test_from_hf_dict_llama31_rope_scaling_and_eos_list():
    cfg = ModelConfig.from_hf_dict(LLAMA31_8B)
    assert cfg.architecture == "llama" and cfg.dim_per_head == 128 and cfg.group_size == 4
    assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert cfg.eos_token_id == 128001 and cfg.bos_token_id == 128000
    assert not cfg.attention_bias and not cfg.qk_norm and cfg.sliding_window is None
    assert cfg.num_params() == 8_030_261_248  # Llama-3.1-8B's published parameter count


def test_from_hf_dict_architecture_specific_parts():
    qwen2 = ModelConfig.from_hf_dict(QWEN2_05B)
    assert qwen2.architecture == "qwen2" and qwen2.attention_bias and not qwen2.qk_norm
    assert qwen2.sliding_window is None  # use_sliding_window is false
    assert qwen2.tie_word_embeddings
    assert qwen2.num_params() == 494_032_768  # Qwen2-0.5B
    qwen3 = ModelConfig.from_hf_dict(QWEN3_06B)
    assert qwen3.architecture == "qwen3" and qwen3.qk_norm and not qwen3.attention_bias
    assert qwen3.dim_per_head == 128 != qwen3.hidden_size // qwen3.num_attention_heads
    mistral = ModelConfig.from_hf_dict(MISTRAL_7B_V01)
    assert mistral.architecture == "mistral" and mistral.sliding_window == 4096
    assert mistral.num_params() == 7_241_732_096  # Mistral-7B-v0.1
    # transformers >= 5 nests rope_theta in rope_parameters
    nested = dict(QWEN3_06B)
    del nested["rope_theta"]
    nested["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert ModelConfig.from_hf_dict(nested).rope_theta == 1e6


def test_from_hf_dict_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="model_type") as e:
        ModelConfig.from_hf_dict(dict(LLAMA31_8B, model_type="gpt2"))
    assert "gpt2" in str(e.value)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if PRESETS[n].architecture in
                                        ("llama", "qwen2", "qwen3", "mistral")))
def test_hf_dict_round_trip_of_presets(name):
    cfg = PRESETS[name]
    # config.json always spells head_dim out; everything else comes back unchanged
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(head_dim=cfg.dim_per_head)


@pytest.mark.parametrize("cfg", [tiny_config("llama"), tiny_config("qwen2"), tiny_config("qwen3"),
                                 tiny_config("mistral", sliding_window=4),
                                 tiny_config("llama", tie_word_embeddings=True, head_dim=32,
                                             rope_scaling=RopeScaling(rope_type="linear", factor=2.0))])
def test_hf_dict_round_trip_and_num_params_of_tiny_configs(cfg):
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(head_dim=cfg.dim_per_head)
    _, state = abstract_model(cfg)
    allocated = sum(v.get_value().size for _, v in nnx.to_flat_state(state))
    assert cfg.num_params() == allocated


def test_published_parameter_counts_of_presets():
    assert PRESETS["smollm2-135m"].num_params() == 134_515_008
    assert PRESETS["llama3-8b"].num_params() == 8_030_261_248
    assert PRESETS["qwen2-0.5b"].num_params() == 494_032_768
    assert PRESETS["mistral-7b"].num_params() == 7_248_023_552  # v0.3 (32768-token vocabulary)
