"""Expert parallelism on 8 simulated CPU devices (mesh data=2 x expert=4), in a subprocess because
the device count must be fixed before jax starts (this process has one device)."""

from __future__ import annotations

import pytest
from moe_helpers import HERE, run_with_devices


@pytest.fixture(scope="module")
def mesh_results():
    return run_with_devices(HERE / "mesh_checks.py", 8)


@pytest.mark.slow
def test_distributed_moe_equals_single_device(mesh_results):
    r = mesh_results
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "expert": 4}
    assert r["balanced_eager_diff"] < 1e-5
    assert r["balanced_jit_diff"] < 1e-5
    assert r["expert_weights_spec"] == "P('expert',)"
    assert "data" in r["output_spec"] and "expert" in r["output_spec"]
    assert r["grad_diff"] < 1e-5, "gradients through all_to_all match the single-device gradients"


@pytest.mark.slow
def test_skewed_expert_load_with_drops_matches_grouped_single_device(mesh_results):
    r = mesh_results
    assert r["skewed_max_load"] > 2.0 / 8, "the load really is skewed"
    assert r["skewed_dropped"][0] > 0 and r["skewed_dropped"][0] == r["skewed_dropped"][1]
    assert r["skewed_processed_equal"]
    assert r["skewed_diff"] < 1e-5


@pytest.mark.slow
def test_distributed_errors_are_clear(mesh_results):
    r = mesh_results
    assert "num_experts=6 is not divisible by the 'expert' mesh axis size 4" in r["indivisible_error"]
    assert "T=12 must be divisible by data x expert devices (8)" in r["token_error"]


@pytest.mark.slow
def test_expert_sharded_kv_cache_on_the_expert_axis(mesh_results):
    r = mesh_results
    assert r["cache_experts_per_device"] == [1], "each device holds one expert's shard"
    assert r["sharded_cache_jit_diff"] < 1e-5
    assert r["sharded_cache_shard_map_diff"] < 1e-5
