"""Reading and writing Hugging Face checkpoint folders: `config.json`, `model.safetensors` or a
sharded `model.safetensors.index.json`, and the tokenizer files. Offline only."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pikv_jax.config import ModelConfig
from pikv_jax.models.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class MissingCheckpointFile(FileNotFoundError, ValueError):
    """A file a checkpoint folder needs is absent: both a missing file and a malformed model folder."""


def one_line(e: BaseException) -> str:
    """An exception's message with its whitespace (newlines included) collapsed, for one-line errors."""
    return " ".join(str(e).split())


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {one_line(e)})") from e


def load_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise MissingCheckpointFile(f"no config.json in {folder!r}: a Hugging Face model folder needs one")
    return ModelConfig.from_hf_dict(_read_json(path), source=path)


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint's weight files: from the shard index if present, else model.safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty; expected an object mapping "
                             "tensor names to shard file names")
        bad = [v for v in weight_map.values() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"{index}: field 'weight_map' holds {bad[0]!r}; expected shard file names (strings)")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise MissingCheckpointFile(f"no weights in {folder!r}: expected {SINGLE_FILE} or {INDEX_FILE} "
                                    "next to config.json")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise MissingCheckpointFile(f"checkpoint shard listed in {index} is missing: {p!r}")
    return paths


def weights_source(folder: str) -> str:
    """The file to name in errors about the folder's tensors: model.safetensors, or the shard index."""
    files = safetensors_files(folder)
    return files[0] if len(files) == 1 else os.path.join(folder, INDEX_FILE)


def load_hf_weights(folder: str, *, progress=None) -> dict:
    """All tensors of the checkpoint keyed by name (jax arrays, dtype as stored, bf16 included)."""
    out = {}
    files = safetensors_files(folder)
    for i, path in enumerate(files):
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({one_line(e)})") from e
        if progress is not None:
            progress(i + 1, len(files))
    return out


def load_hf_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer (tokenizer.json, with tokenizer_config.json), or None without tokenizer.json."""
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        return None
    try:
        return Tokenizer.from_hf_folder(folder)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{os.path.join(folder, 'tokenizer.json')} (or tokenizer_config.json): not a readable "
                         f"tokenizer ({type(e).__name__}: {one_line(e)})") from e


def load_hf_folder(folder: str, *, progress=None):
    """(config, weights, tokenizer or None) of a Hugging Face checkpoint folder. Malformed files raise a
    one-line ValueError naming the file and the field."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder!r}")
    cfg = load_hf_config(folder)
    weights = load_hf_weights(folder, progress=progress)
    return cfg, weights, load_hf_tokenizer(folder)


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
