"""Expert-parallel MoE generation: a Mixtral-shaped model on meshes with an `expert` axis gives one
device's greedy ids, its expert weights are split over `expert`, and the expert layer moves one
[B/data, H] psum per layer per decode step (8 simulated CPU devices, one subprocess running
moe_sharded_checks.py); the expert-parallel block itself on one device."""

from __future__ import annotations

import pathlib

import eight_devices
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pikv_jax.moe.expert_parallel import ExpertParallel, local_experts_output
from pikv_jax.moe.pikv_moe import PiKVMoE
from pikv_jax.parallel import mesh_from_spec

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "moe_sharded_checks.py"
MESHES = {"data=2,expert=4": dict(expert=4, data=2), "data=2,model=2,expert=2": dict(expert=2, data=2)}
METHODS = ["full", "h2o@0.5", "int4(group_size=8,residual_length=16)"]
B, H, L = 4, 128, 2  # the checks' batch, hidden size, layers


# ---------------------------------------------------------------------------------- one device

def test_local_experts_of_all_shards_sum_to_the_layer_output():
    """The per-shard pieces of the psum (each shard's experts, zeros elsewhere) add up to the
    dropless layer's output, for any split of the experts."""
    moe = PiKVMoE(16, 8, 2, rank=2, dropless=True, intermediate_size=24, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (10, 16))
    r = moe.router.route(x)
    w = moe.experts.weights()
    want = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
    part = jax.jit(lambda kept, w, first: local_experts_output(x, r.expert_idx, r.gates, kept, w, first=first,
                                                               lora_scale=moe.experts.lora_scale))
    for shards in (2, 8):
        n = 8 // shards
        parts = [part(r.active, {k: v[j * n:(j + 1) * n] for k, v in w.items()}, j * n) for j in range(shards)]
        np.testing.assert_allclose(np.asarray(sum(parts)), want, rtol=1e-5, atol=1e-5)
    # an assignment that is not kept contributes nothing
    assert not np.any(np.asarray(part(jnp.zeros_like(r.active), w, 0)))


def test_expert_parallel_placement_is_checked_and_one_shard_equals_the_plain_path():
    mesh = mesh_from_spec("data=1,expert=1")
    with pytest.raises(ValueError, match="expert_axis='model' is not an axis of the mesh"):
        ExpertParallel(mesh, expert_axis="model").check(8)
    moe = PiKVMoE(16, 8, 2, rank=0, dropless=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 16))
    call = lambda m: np.asarray(nnx.jit(lambda m, x: m(x))(m, x))
    want = call(moe)
    assert moe.shard_experts(ExpertParallel(mesh)).expert_parallel.num_shards == 1
    np.testing.assert_array_equal(call(moe), want)  # the shard_map path on a 1 x 1 mesh
    assert moe.shard_experts(None).expert_parallel is None


# ---------------------------------------------------------------------------------- 8 devices

@pytest.fixture(scope="module")
def checks() -> dict:
    return eight_devices.run_checks(SCRIPT)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("method", METHODS)
def test_moe_greedy_ids_equal_single_device(checks, mesh, method):
    r = checks["meshes"][mesh]
    m = r["methods"][method]
    assert m["equal"], (m["single"], m["sharded"])
    assert m["finish_equal"] and m["evicted"] == method.startswith("h2o")
    assert r["parallel_layers"] == L, "every MoE block runs expert-parallel"


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_expert_weights_are_split_over_the_expert_axis(checks, mesh):
    r = checks["meshes"][mesh]
    assert r["expert_specs"] == ["P('expert',)"]
    assert r["expert_bytes_per_device"] * MESHES[mesh]["expert"] == checks["expert_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_expert_layer_moves_one_activation_psum_per_layer(checks, mesh):
    h = checks["meshes"][mesh]["hlo"]
    rows = B // MESHES[mesh]["data"]
    # over `expert` alone: exactly the MoE psum, f32[B/data, H] once per layer
    assert h["expert_ops"] == ["all-reduce"] and h["expert_count"] == L
    assert h["expert_arrays"] == [rows * H * 4] and h["expert_bytes"] == L * rows * H * 4
    # nothing in the program is cache-sized or weight-sized (one expert's projection is 32 KiB)
    slot_axis = rows * h["capacity"] * 4
    assert h["max_bytes"] <= B * H * 4 < min(slot_axis, checks["one_expert_bytes"])


@pytest.mark.slow
def test_capacity_dispatch_drops_the_same_assignments(checks):
    r = checks["qwen_capacity"]
    assert r["parallel"] and r["block_close"] and r["processed_equal"], r
    assert r["dropped"][0] == r["dropped"][1] > 0


@pytest.mark.slow
def test_an_expert_axis_that_does_not_divide_the_experts(checks):
    e = checks["errors"]
    assert e["indivisible"] == "num_experts=6 is not divisible by the 'expert' mesh axis size 4"
    assert e["indivisible_model"] == ("mesh axis 'expert' of size 4 does not divide num_experts=6; "
                                      "pick a size that divides it")
