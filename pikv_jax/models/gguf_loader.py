"""Loading a GGUF file (llama.cpp's format) offline: config from metadata, dequantized weights
renamed to Hugging Face names, Q/K rows un-permuted back to HF's rotate-half order, tokenizer.

llama.cpp's converter interleaves each head's Q/K rows (pairs (i, i + D/2) become adjacent) for
its RoPE kernel; `unpermute_qk` inverts that so HF's rotate-half RoPE applies unchanged.
"""

from __future__ import annotations

import os
import re

import numpy as np

from pikv_jax.config import ModelConfig, RopeScaling
from pikv_jax.models.tokenizer import Tokenizer
import gguf

_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
_PERMUTED_ARCHS = ("llama", "mistral")  # architectures whose Q/K rows llama.cpp permutes

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: w [n_heads * D, ...] (or a bias [n_heads * D])."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in the Llama family")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def open_gguf(path: str):
    """A `gguf.GGUFReader`, with clear errors for a missing or corrupt file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path!r}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad bytes
        raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def config_from_gguf(reader) -> ModelConfig:
    f = reader.fields

    def get(key, default=None):
        fld = f.get(key)
        return default if fld is None else fld.contents()

    arch = get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported; allowed: {sorted(_GGUF_ARCHS)}")
    n_heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    key_len = get(f"{arch}.attention.key_length")
    names = {t.name for t in reader.tensors}
    vocab = get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(get("tokenizer.ggml.tokens"))
    rope_scaling = None
    scaling_type = get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(get(f"{arch}.rope.scaling.factor")))
    return ModelConfig(
        architecture=_GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(get(f"{arch}.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(key_len) if key_len is not None else None,
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=get(f"{arch}.attention.sliding_window"),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
    )


def load_gguf(path: str, *, progress=None) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """(config, float32 weights keyed by HF name, tokenizer) of a GGUF file."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    arch = reader.fields["general.architecture"].contents()
    weights = {}
    tensors = list(reader.tensors)
    for i, t in enumerate(tensors):
        name = hf_name(t.name)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise ValueError(f"{path!r}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from e
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{path!r}: tensor {t.name} holds {arr.size} values, expected shape {shape}")
        arr = arr.reshape(shape)
        if arch in _PERMUTED_ARCHS and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_qk(arr, cfg.num_attention_heads)
        elif arch in _PERMUTED_ARCHS and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_qk(arr, cfg.num_key_value_heads)
        weights[name] = arr
        if progress is not None:
            progress(i + 1, len(tensors))
    return cfg, weights, Tokenizer.from_gguf_fields(reader.fields)
