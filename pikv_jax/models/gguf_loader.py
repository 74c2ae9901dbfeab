"""Loading a GGUF file (llama.cpp's format) offline: config from metadata, dequantized weights
renamed to Hugging Face names, Q/K rows un-permuted back to HF's rotate-half order, tokenizer.

llama.cpp's converter interleaves each head's Q/K rows (pairs (i, i + D/2) become adjacent) for
its RoPE kernel; `unpermute_qk` inverts that so HF's rotate-half RoPE applies unchanged.
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

from pikv_jax.config import ModelConfig, RopeScaling
from pikv_jax.models.hf_loader import one_line
from pikv_jax.models.tokenizer import Tokenizer

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


GGUF_MAGIC = b"GGUF"
_REQUIRED = object()


def open_gguf(path: str):
    """A `gguf.GGUFReader`, with clear one-line errors for a missing, foreign, truncated or corrupt file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path!r}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {one_line(e)})") from e
    if head != GGUF_MAGIC:
        raise ValueError(f"{path}: not a readable GGUF file: it starts with {head!r}, a GGUF file starts with "
                         f"{GGUF_MAGIC!r}" + (" (the file is empty)" if not head else ""))
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: "
                         f"{one_line(e)})") from e


class _Metadata:
    """Typed reads of GGUF metadata; errors name the file, the key and what is allowed."""

    def __init__(self, reader, source: str):
        self.fields, self.source = reader.fields, source

    def get(self, key: str, default=None):
        fld = self.fields.get(key)
        if fld is None:
            return default
        try:
            return fld.contents()
        except Exception as e:  # a field whose bytes do not decode
            raise ValueError(f"{self.source}: GGUF metadata key {key!r} is unreadable ({one_line(e)})") from e

    def number(self, key: str, default=_REQUIRED, *, integer: bool = True, allowed: str = "an integer >= 1"):
        value = self.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: GGUF metadata key {key!r} is missing; expected {allowed}")
            return default
        what = f"{self.source}: GGUF metadata key {key!r}={value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{what} is not a number; expected {allowed}")
        if integer and not float(value).is_integer():
            raise ValueError(f"{what} is not an integer; expected {allowed}")
        return int(value) if integer else float(value)


def config_from_gguf(reader, source: str = "GGUF file") -> ModelConfig:
    """The model config in a GGUF's metadata; a missing or bad key raises a ValueError naming `source`."""
    m = _Metadata(reader, source)
    arch = m.get("general.architecture")
    if arch is None:
        raise ValueError(f"{source}: GGUF metadata key 'general.architecture' is missing; allowed: "
                         f"{sorted(_GGUF_ARCHS)}")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{source}: GGUF general.architecture={arch!r} is not supported; allowed: "
                         f"{sorted(_GGUF_ARCHS)}")
    n_heads = m.number(f"{arch}.attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = m.number(f"{arch}.vocab_size", None)
    if vocab is None:
        tokens = m.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{source}: GGUF metadata keys {arch}.vocab_size and tokenizer.ggml.tokens are both "
                             "missing; expected the vocabulary size or the token list")
        vocab = len(tokens)
    try:
        rope_scaling = None
        if m.get(f"{arch}.rope.scaling.type") == "linear":
            rope_scaling = RopeScaling(rope_type="linear", factor=m.number(
                f"{arch}.rope.scaling.factor", integer=False, allowed="a number > 0"))
        return ModelConfig(
            architecture=_GGUF_ARCHS[arch],
            vocab_size=vocab,
            hidden_size=m.number(f"{arch}.embedding_length"),
            intermediate_size=m.number(f"{arch}.feed_forward_length"),
            num_hidden_layers=m.number(f"{arch}.block_count"),
            num_attention_heads=n_heads,
            num_key_value_heads=m.number(f"{arch}.attention.head_count_kv", n_heads),
            head_dim=m.number(f"{arch}.attention.key_length", None),
            rope_theta=m.number(f"{arch}.rope.freq_base", 10000.0, integer=False, allowed="a number > 0"),
            rope_scaling=rope_scaling,
            rms_norm_eps=m.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, integer=False,
                                  allowed="a number > 0"),
            max_position_embeddings=m.number(f"{arch}.context_length", 4096),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            sliding_window=m.number(f"{arch}.attention.sliding_window", None),
            bos_token_id=m.number("tokenizer.ggml.bos_token_id", None, allowed="a token id >= 0"),
            eos_token_id=m.number("tokenizer.ggml.eos_token_id", None, allowed="a token id >= 0"),
        )
    except ValueError as e:  # ModelConfig's range checks: say which file the values came from
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source}: {e}") from e


def load_gguf(path: str, *, progress=None) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """(config, float32 weights keyed by HF name, tokenizer) of a GGUF file. Malformed files raise a
    one-line ValueError naming the file and the key or tensor."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, source=path)
    arch = reader.fields["general.architecture"].contents()
    weights = {}
    tensors = list(reader.tensors)
    for i, t in enumerate(tensors):
        try:
            name = hf_name(t.name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): "
                             f"{one_line(e)}") from e
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {t.name} holds {arr.size} values, expected shape {shape}")
        arr = arr.reshape(shape)
        if arch in _PERMUTED_ARCHS and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_qk(arr, cfg.num_attention_heads)
        elif arch in _PERMUTED_ARCHS and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_qk(arr, cfg.num_key_value_heads)
        weights[name] = arr
        if progress is not None:
            progress(i + 1, len(tensors))
    try:
        tok = Tokenizer.from_gguf_fields(reader.fields)
    except Exception as e:  # missing or malformed tokenizer.ggml.* keys; tokenizers raises a bare Exception
        raise ValueError(f"{path}: GGUF tokenizer metadata (tokenizer.ggml.*) is unusable ({type(e).__name__}: "
                         f"{one_line(e)})") from e
    return cfg, weights, tok
