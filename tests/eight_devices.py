"""Runs a checks script on 8 simulated CPU devices and returns the JSON line it prints.

The device count is fixed when jax starts, and a test process has one device, so multi-device
checks run in a subprocess whose XLA_FLAGS ask for 8. LLVM -O0 halves the compile time that
dominates those runs; both sides of every comparison run under it, and the SPMD partitioning (hence
the collectives the checks read) is done by HLO passes it leaves as they are.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def run_checks(script: pathlib.Path, *args: str, timeout: int = 900) -> dict:
    """The last stdout line of `script *args` as JSON, after checking it saw 8 devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags += ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                               if p])
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(TESTS.parent))
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    return out


def decode_program_collectives(model, policy, prompts, capacity: int, max_new_tokens: int):
    """(`hlo_collectives` of `model`'s compiled decode program for `prompts` under `policy` with
    `capacity` slots per layer, the placed abstract cache), compiled as `generate` compiles it:
    the loop state carries its shardings and the decode step is jitted with it donated. Used by
    the checks scripts, which run with 8 devices."""
    import jax
    import jax.numpy as jnp

    from pikv_jax.api import generation_functions
    from pikv_jax.bench import hlo_collectives
    from pikv_jax.cache.policies.base import init_policy_cache
    from pikv_jax.runtime import sharding as ms
    from pikv_jax.runtime.generate import GenerationLoop
    from pikv_jax.sampling import SamplingConfig

    cfg = model.config
    tokens, lengths = model.pad_prompt_batch(prompts)
    cache = jax.eval_shape(lambda: init_policy_cache(policy, len(prompts), (capacity,) * cfg.num_hidden_layers,
                                                     num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                                                     dtype=model.cache_dtype))
    cache = ms.with_shardings(cache, ms.cache_shardings(cache, model.mesh))
    loop = GenerationLoop(graphdef=model.graphdef, policy=policy, sampling=SamplingConfig(),
                          max_new_tokens=max_new_tokens, stop_ids=())
    tokens, lengths, key = model._place_inputs(jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0))
    prefill, decode = generation_functions(loop, model.mesh)
    state = jax.eval_shape(prefill, model.params, tokens, lengths, cache, key, None, None)
    state = ms.with_shardings(state, ms.state_shardings(state, model.mesh))
    compiled = jax.jit(decode, donate_argnums=1).lower(model.params, state).compile()
    return hlo_collectives(compiled.as_text()), cache
