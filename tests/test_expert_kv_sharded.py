"""PiKV's expert-sharded KV storage on a device mesh: an expert_kv cache's slot axis split over the
`expert` mesh axis, whole shards per device. On 8 simulated CPU devices (a subprocess: the device
count is fixed before jax starts; tests/expert_kv_sharded_checks.py), a tiny random Llama-shaped
model on data=2,expert=4 against one device: greedy ids, per-device cache bytes measured from the
shards, and the bytes of every collective of the compiled decode step."""

from __future__ import annotations

import pathlib

import eight_devices
import pytest

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "expert_kv_sharded_checks.py"
B, H, D, L = 4, 8, 16, 2  # the checks' batch, query (= KV) heads, head dim, layers
N_SINK = 4  # expert_kv's default sinks
HLO_CAPACITY, SHARDS = 1024, 4
EXACT, TOP1, TOP2 = "expert_kv(shards=4)", "expert_kv(shards=4,top_k=1)", "expert_kv(shards=4,top_k=2)"


@pytest.fixture(scope="module")
def checks() -> dict:
    return eight_devices.run_checks(SCRIPT)


@pytest.mark.parametrize("spec", [EXACT, TOP1, TOP2])
def test_data_expert_greedy_ids_equal_single_device(checks, spec):
    r = checks["methods"][spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["mesh"] == {"data": 2, "expert": 4}
    assert r["shard_tokens"][0] == r["shard_tokens"][1], "same placement on the mesh"
    # routed mode reads by gathering shard blocks on one device and by masking on the mesh
    assert r["read"] == (["gather", "gather"] if spec == EXACT else ["gather", "mask"])


@pytest.mark.parametrize("spec", [EXACT, TOP1])
def test_each_device_holds_one_whole_shard_and_a_quarter_of_the_slot_bytes(checks, spec):
    r = checks["methods"][spec]
    cs = r["capacity"] // SHARDS
    assert r["capacity"] == 72 and r["k_shard_slots"] == [[g * cs, (g + 1) * cs] for g in range(SHARDS)]
    assert r["sharded_cache_bytes"] == r["cache_bytes"]
    # split leaves (k, v, pos, score, centroids, load): 1/2 (data) x 1/4 (expert); the rest (sink and
    # newest slots, counters, lengths) 1/2 (data)
    assert r["rest_bytes"] == L * B * H * (N_SINK + 3) * 4 + B * 4
    assert r["per_device"] * 8 == r["split_bytes"] + 4 * r["rest_bytes"]
    assert r["split_bytes"] > 300 * r["rest_bytes"]


def test_decode_collectives_are_activation_sized_for_exact_and_masked_routed(checks):
    bound = B * H * D * L * 4
    one_shard_kv = (B // 2) * H * (HLO_CAPACITY // SHARDS) * D * 4  # K of one shard, a data shard's rows
    for spec in (EXACT, TOP1):
        r = checks["hlo"][spec]
        assert r["max_bytes"] <= bound, f"{spec}: {r['largest']}"
        assert r["step_bytes"] < one_shard_kv // 8, spec
        assert "all-reduce" in r["ops"], "the softmax over shards on different devices joins its statistics"
    assert checks["hlo"][TOP1]["read"] == "mask"


def test_routed_gather_on_the_mesh_moves_the_selected_shard_blocks(checks):
    # read=gather (the one-device path) on the mesh: XLA fetches the selected shard's keys and values
    # from the device holding it, a masked all-reduce of k/G of the cache per layer, K and V
    r = checks["hlo"]["expert_kv(shards=4,top_k=1,read=gather)"]
    one_shard_kv = (B // 2) * H * (HLO_CAPACITY // SHARDS) * D * 4
    assert r["read"] == "gather" and r["max_bytes"] == one_shard_kv, r["largest"]
    assert r["step_bytes"] >= 2 * L * one_shard_kv


def test_expert_axis_that_does_not_divide_the_shards_raises(checks):
    assert checks["errors"]["expert_not_dividing_shards"] == (
        "mesh axis 'expert' of size 8 does not divide layer 0's 4 KV shards; "
        "pick expert_kv shards that are a multiple of 8")


def test_expert_axis_with_nothing_to_split_raises(checks):
    """A dense model whose cache has no expert_kv shards: the expert axis would only repeat work."""
    assert checks["errors"]["expert_axis_splits_nothing"] == (
        "mesh axis 'expert' of size 8 splits nothing here: the model has no experts and the cache no expert_kv "
        "shards; use it with an MoE model or expert_kv(shards=...), or drop it")
