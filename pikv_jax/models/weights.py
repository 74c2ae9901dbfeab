"""Hugging Face parameter names <-> `CausalLM` state, and building a model from named arrays.

HF stores linear weights as [out, in]; Flax kernels are [in, out]. Everything else keeps its layout.
Building goes through `nnx.eval_shape`, so no random initialisation is paid for loaded weights.

MoE models (models/moe_llama.py): a stacked expert parameter [E, ...] gathers E per-expert HF tensors;
router parameters that checkpoints lack start at zero; non-parameter variables (routing statistics,
EPLB's bias) are runtime state and start empty.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pikv_jax.config import ModelConfig
from pikv_jax.models.llama import CausalLM
from pikv_jax.models.moe_llama import moe_hf_sources


def nnx_path_to_hf(path: tuple) -> tuple[str, bool]:
    """NNX state path -> (HF name, transpose?)."""
    parts = [str(p) for p in path]
    leaf, owner = parts[-1], parts[-2]
    if owner == "embed_tokens":
        return "model.embed_tokens.weight", False
    transpose = leaf == "kernel"
    name = ".".join(parts[:-1] + ["weight" if leaf in ("kernel", "weight") else leaf])
    return (name if parts[0] == "lm_head" else "model." + name), transpose


def hf_sources(cfg: ModelConfig, path: tuple) -> tuple[list[str], bool, bool]:
    """NNX parameter path -> (HF names, transpose?, stacked over experts?). Dense parameters have one
    name; an empty list means checkpoints do not hold the parameter."""
    if cfg.num_experts:
        got = moe_hf_sources(cfg, path)
        if got is not None:
            return got
    name, transpose = nnx_path_to_hf(path)
    return [name], transpose, False


def _runtime_state(value):
    """Initial value of a non-parameter variable of an abstract model: zeros of its shape (or as is)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jnp.zeros(value.shape, value.dtype)
    return value


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, param_dtype=None):
    """(graphdef, abstract state) of a CausalLM, without allocating parameters."""
    abs_model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abs_model)


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    _, state = abstract_model(cfg)
    return [n for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param) for n in hf_sources(cfg, p)[0]]


def build_model(cfg: ModelConfig, weights: Mapping[str, np.ndarray | jax.Array], *, dtype=jnp.float32,
                param_dtype=None, source: str = "checkpoint") -> CausalLM:
    """A CausalLM whose parameters come from `weights` (HF names). Missing or misshapen tensors raise."""
    graphdef, state = abstract_model(cfg, dtype, param_dtype)
    flat = []
    missing = []
    used = set()
    for path, var in nnx.to_flat_state(state):
        want = var.get_value()
        if not isinstance(var, nnx.Param):  # runtime state (MoE statistics, EPLB bias)
            flat.append((path, var.replace(_runtime_state(want))))
            continue
        names, transpose, stacked = hf_sources(cfg, path)
        if not names:  # a parameter checkpoints do not hold (MoE router extras): starts at zero
            flat.append((path, var.replace(jnp.zeros(want.shape, want.dtype))))
            continue
        absent = [n for n in names if n not in weights]
        if absent:
            missing.extend(absent)
            continue
        used.update(names)
        arrs = [weights[n].T if transpose else weights[n] for n in names]
        if stacked:  # one HF tensor per expert -> [E, ...]
            exp = tuple(want.shape[1:])
            for n, a in zip(names, arrs):
                if tuple(a.shape) != exp:
                    raise ValueError(f"{source}: tensor {n} has shape {tuple(a.shape[::-1] if transpose else a.shape)}"
                                     f", expected {exp[::-1] if transpose else exp} for this config")
        arr = jnp.stack([jnp.asarray(a) for a in arrs]) if stacked else arrs[0]
        if tuple(arr.shape) != tuple(want.shape):
            raise ValueError(f"{source}: tensor {names[0]} has shape "
                             f"{tuple(arr.shape[::-1] if transpose and not stacked else arr.shape)}, expected "
                             f"{tuple(want.shape[::-1] if transpose else want.shape)} for this config")
        flat.append((path, var.replace(jnp.asarray(arr, dtype=want.dtype))))
    if missing:
        raise ValueError(f"{source}: missing tensors for architecture {cfg.architecture!r}: {missing[:6]}"
                         + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    unexpected = _unexpected(weights.keys(), used, cfg)
    if unexpected:
        raise ValueError(f"{source}: tensors this architecture does not use: {unexpected[:6]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _unexpected(names: Iterable[str], used: set[str], cfg: ModelConfig) -> list[str]:
    ignorable = ("rotary_emb.inv_freq",)
    out = []
    for n in names:
        if n in used or n.endswith(ignorable):
            continue
        if n == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the head
        out.append(n)
    return out


def model_to_hf_weights(model: CausalLM) -> dict[str, jax.Array]:
    """HF-named arrays of a model (for writing a Hugging Face checkpoint folder)."""
    _, state = nnx.split(model)
    out = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            continue
        names, transpose, stacked = hf_sources(model.config, path)
        arr = var.get_value()
        for e, name in enumerate(names):
            a = arr[e] if stacked else arr
            out[name] = a.T if transpose else a
    return out


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=None) -> CausalLM:
    """Random initialisation at the config's real shapes (benchmarks, tests)."""
    return CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
