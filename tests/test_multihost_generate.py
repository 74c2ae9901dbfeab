"""Two real processes on 127.0.0.1 (4 CPU devices each, gloo collectives) run sharded
`PiKVModel.generate` on one data=2 x model=4 mesh over all 8 devices, each process holding only its
shards, launched by `scripts/launch_multihost.py --processes 2 generate`: the greedy ids equal the
single-device ids computed in this process, per cache method."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import multihost_generate as mg
finally:
    sys.path.pop(0)

METHODS = ["full", "h2o@0.5", mg.KIVI]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multihost_generate") / "ids.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # LLVM -O0: compile time dominates this run (as in test_sharded_generate.py); the reference below
    # runs at the default level, so equal ids also say the level does not change them
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_backend_optimization_level" not in f) + " --xla_backend_optimization_level=0"
    methods = [a for m in METHODS for a in ("--method", m)]
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_multihost.py"), "--processes", "2", "--timeout", "400",
           "generate", "--mesh", "data=2,model=4", *methods, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=450, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[p0] {")]
    assert len(printed) == 1 and not any(line.startswith("[p1] {") for line in proc.stdout.splitlines()), \
        "only process 0 prints the JSON"
    result = json.loads(out.read_text())
    assert json.loads(printed[0][len("[p0] "):]) == result
    return result


@pytest.fixture(scope="module")
def single_device() -> dict:
    from pikv_jax.api import PiKVModel

    return mg.generate_all(PiKVModel.from_config(mg.config(), seed=0), METHODS)


def row_state_bytes(spec: str) -> int:
    """Bytes of the cache's per-row leaves (rank <= 1), which split over `data` only."""
    from pikv_jax.api import PiKVModel
    from pikv_jax.cache.policies.base import init_policy_cache
    from pikv_jax.eval.methods import parse_method

    model = PiKVModel.from_config(mg.config(), seed=0)
    policy = model.bind_policy(parse_method(spec, model=model, context_len=mg.CONTEXT).policy)
    cfg = model.config
    width = model.pad_prompt_batch(mg.prompts())[0].shape[1]
    caps = tuple(policy.capacity_for(i, width, mg.MAX_NEW) for i in range(cfg.num_hidden_layers))
    cache = jax.eval_shape(lambda: init_policy_cache(policy, len(mg.LENGTHS), caps,
                                                     num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                                                     dtype=model.cache_dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim <= 1)


@pytest.mark.slow
def test_two_processes_form_one_mesh(two_processes):
    r = two_processes
    assert r["process_id"] == 0 and r["num_processes"] == 2
    assert r["num_devices"] == 8 and r["local_devices"] == 4
    assert r["mesh"] == {"data": 2, "model": 4}


@pytest.mark.slow
@pytest.mark.parametrize("spec", METHODS)
def test_two_process_ids_equal_single_device(two_processes, single_device, spec):
    got, want = two_processes["methods"][spec], single_device[spec]
    assert got["token_ids"] == want["token_ids"]
    assert got["finish_reasons"] == want["finish_reasons"]
    assert got["cache_bytes"] == want["cache_bytes"] and got["seen_tokens"] == want["seen_tokens"]
    assert got["kept_tokens"] == want["kept_tokens"]
    if spec == "h2o@0.5":
        assert got["kept_tokens"] < got["seen_tokens"], "the budget must make h2o evict"
    # per process's devices: [B, Hkv, ...] leaves 1/8 (rows over data, KV heads over model), per-row ones 1/2
    rows = row_state_bytes(spec)
    assert got["cache_bytes_per_device"] * 8 == (got["cache_bytes"] - rows) + 4 * rows
