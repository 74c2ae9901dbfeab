"""Reading and writing Hugging Face checkpoint folders: `config.json`, `model.safetensors` or a
sharded `model.safetensors.index.json`, and the tokenizer files. Offline only."""

from __future__ import annotations

import json
import os

import numpy as np

from pikv_jax.config import ModelConfig
from pikv_jax.models.tokenizer import Tokenizer
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e


def load_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    return ModelConfig.from_hf_dict(_read_json(path))


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint's weight files: from the shard index if present, else model.safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index!r} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"checkpoint shard listed in the index is missing: {p!r}")
    return paths


def load_hf_weights(folder: str, *, progress=None) -> dict:
    """All tensors of the checkpoint keyed by name (jax arrays, dtype as stored, bf16 included)."""
    out = {}
    files = safetensors_files(folder)
    for i, path in enumerate(files):
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e
        if progress is not None:
            progress(i + 1, len(files))
    return out


def load_hf_folder(folder: str, *, progress=None):
    """(config, weights, tokenizer or None) of a Hugging Face checkpoint folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder!r}")
    cfg = load_hf_config(folder)
    weights = load_hf_weights(folder, progress=progress)
    tok = Tokenizer.from_hf_folder(folder) if os.path.exists(os.path.join(folder, "tokenizer.json")) else None
    return cfg, weights, tok


def save_hf_folder(folder: str, cfg: ModelConfig, weights: dict, tokenizer: Tokenizer | None = None,
                   *, max_shard_bytes: int | None = None) -> None:
    """Writes a loadable HF folder. With `max_shard_bytes`, shards the weights and writes the index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=1)
    arrays = {k: np.asarray(v) for k, v in weights.items()}
    if max_shard_bytes is None:
        save_file(arrays, os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
    else:
        shards, cur, size = [], {}, 0
        for k in sorted(arrays):
            if cur and size + arrays[k].nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = arrays[k]
            size += arrays[k].nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for a in arrays.values())
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_hf_folder(folder)
