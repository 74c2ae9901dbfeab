"""Generation with the cache's slot axis split over a `seq` mesh axis: the capacity rules (one
process), and on 8 simulated CPU devices (a subprocess: the device count is fixed before jax
starts) greedy ids equal to one device's per cache method on data=2,seq=4 and model=2,seq=4,
per-device cache bytes measured from the shards, the bytes of every collective of the compiled
decode step, and SmolLM2 (3 KV heads) on data=2,seq=4."""

from __future__ import annotations

import pathlib

import eight_devices
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from pikv_jax.cache.quantized import init_quantized_layer
from pikv_jax.cache.state import init_cache
from pikv_jax.runtime import sharding as ms

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "seq_sharded_checks.py"
B, H, D, L = 4, 8, 16, 2  # the checks' batch, query (= KV) heads, head dim, layers
HLO_CAPACITY = 1024
KIVI = "int4(group_size=8,residual_length=8)"
METHODS = ["full", "streaming_llm@0.5", "h2o@0.5", "tova@0.5", "snapkv(obs_window=16)@0.5",
           "quest(dense_layers=1,page_size=2)@0.25", KIVI]
NOT_EVICTING = {"full", "quest(dense_layers=1,page_size=2)@0.25", KIVI}


# ---------------------------------------------------------------------------------- one process

def abstract_mesh(**axes) -> AbstractMesh:
    return AbstractMesh(tuple(axes.values()), tuple(axes))


def test_seq_capacities_round_up_only_what_does_not_evict():
    mesh = abstract_mesh(data=2, seq=4)
    assert ms.seq_capacities((74, 72, 1), False, mesh) == (76, 72, 4)  # free slots only: same tokens kept
    assert ms.seq_capacities((74, 72), True, mesh) == (74, 72)  # a budget: more slots would keep more
    assert ms.seq_capacities((74,), False, abstract_mesh(data=2, model=4)) == (74,)
    assert ms.seq_capacities((74,), False, None) == (74,)


def test_seq_that_does_not_divide_a_budget_is_a_one_line_error():
    cache = jax.eval_shape(lambda: init_cache(4, (32, 30), num_layers=2, num_kv_heads=8, head_dim=16))
    ms.check_seq(cache, abstract_mesh(data=2, seq=2))
    with pytest.raises(ValueError, match=r"^mesh axis 'seq' of size 4 does not divide layer 1's cache of 30 slots; "
                                         r"pick a seq size that divides it, or a budget that is a multiple of 4$"):
        ms.check_seq(cache, abstract_mesh(data=2, seq=4))
    assert ms.seq_units(cache.layers[0]) == 32


def test_kivi_cache_that_is_all_ring_has_nothing_for_seq_to_split():
    layer = jax.eval_shape(lambda: init_quantized_layer(2, 2, 8, 16, jnp.float32, bits=4, group_size=8,
                                                        residual_length=16, scale_dtype=jnp.float16))
    assert layer.quantized_slots == 0 and ms.seq_units(layer) is None


# ---------------------------------------------------------------------------------- 8 devices

def run_checks(*args: str) -> dict:
    return eight_devices.run_checks(SCRIPT, *args)


@pytest.fixture(scope="module")
def checks() -> dict:
    return run_checks()


@pytest.mark.parametrize("spec", METHODS)
def test_data_seq_greedy_ids_equal_single_device(checks, spec):
    r = checks["methods"][spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["finish_equal"] and r["mesh"] == {"data": 2, "seq": 4}
    assert r["evicted"] == (spec not in NOT_EVICTING), "budgets must make the evicting methods evict"
    assert r["sharded_cache_bytes"] == r["cache_bytes"], "capacities chosen so that seq=4 divides them"


@pytest.mark.parametrize("spec", METHODS)
def test_cache_bytes_per_device_fall_by_seq_on_the_split_leaves(checks, spec):
    r = checks["methods"][spec]
    assert r["split_bytes"] > 0 and r["split_bytes"] + r["rest_bytes"] == r["cache_bytes"]
    # split leaves: 1/2 (data) x 1/4 (seq); the rest (lengths, KIVI's ring, scores and counters): 1/2 (data)
    assert r["per_device"] * 8 == r["split_bytes"] + 4 * r["rest_bytes"]
    if spec != KIVI:  # a uniform cache splits every slot array: only lengths (and Quest's sync flags) remain
        assert r["rest_bytes"] <= 5 * B


@pytest.mark.parametrize("spec", ["full", "tova@0.5"])
def test_model_seq_greedy_ids_equal_single_device(checks, spec):
    r = checks["model_seq"][spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["mesh"] == {"model": 2, "seq": 4}
    assert r["per_device"] * 8 == r["split_bytes"] + 8 * r["rest_bytes"], "heads 1/2, slots 1/4, rows whole"


def test_decode_collectives_are_activation_sized_never_cache_sized(checks):
    bound = B * H * D * L * 4
    slot_axis = (B // 2) * HLO_CAPACITY * 4  # the smallest collective carrying a whole slot axis
    assert bound < slot_axis
    for name, r in checks["hlo"].items():
        assert r["capacity"] >= HLO_CAPACITY and r["split_elements"] > 0, name
        assert "all-reduce" in r["ops"], f"{name}: the softmax over split slots joins its statistics"
        if name.startswith("quest") or name.startswith("h2o@0.5+"):
            continue
        assert r["max_bytes"] <= bound, f"{name}: {r['largest']}"
    for name, r in checks["hlo"].items():  # none of them reshuffles a slot axis ...
        assert ("all-to-all" in r["ops"]) == name.startswith("h2o@0.5+"), name
    # ... except H2O over KIVI: its score row f32[B, Hkv, Cq + R] is kept whole (replicated over seq,
    # it does not split along the quantized groups), so each step redistributes it: O(B * Hkv * C)
    # bytes per step, in all-to-alls whose single arrays stay small; and the ring (R = 8 slots,
    # replicated) is joined once per layer, keys and values
    kivi = checks["hlo"][f"h2o@0.5+{KIVI}"]
    assert kivi["max_bytes"] == (B // 2) * H * 8 * D * 4
    assert kivi["by_op"]["all-to-all"]["bytes"] >= (B // 2) * H * HLO_CAPACITY * 4
    # Quest gathers the keys and values of its selected pages (3 pages of 8 slots, k and v) from the
    # shards that hold them: O(token budget), not O(capacity)
    quest = checks["hlo"]["quest(dense_layers=1,page_size=8)@0.25"]
    assert quest["max_bytes"] == (B // 2) * H * (3 * 8) * D * 4


def test_tova_on_model_seq_all_reduces_its_row_score_over_slot_shards(checks):
    # TOVA's head mean joins the heads of a row over `model`: one f32[B, C/seq] all-reduce per layer
    r = checks["hlo_model_seq"]
    assert r["full"]["max_bytes"] <= B * H * D * L * 4, r["full"]["largest"]
    assert r["tova@0.5"]["max_bytes"] == B * (HLO_CAPACITY // 4) * 4, r["tova@0.5"]["largest"]


def test_seq_that_does_not_divide_an_evicting_budget_raises(checks):
    assert checks["errors"]["seq_budget"] == ("mesh axis 'seq' of size 4 does not divide layer 0's cache of 30 slots; "
                                              "pick a seq size that divides it, or a budget that is a multiple of 4")


@pytest.fixture(scope="module")
def smollm2_checks() -> dict:
    return run_checks("--smollm2")["smollm2"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["h2o@0.5"])
def test_smollm2_on_model_seq_equals_one_device(smollm2_checks, spec):
    """SmolLM2's seq and replicated-head layouts at once: 3 KV heads do not divide model=2."""
    assert smollm2_checks["prompt_tokens"] == 100
    r = smollm2_checks[spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["mesh"] == {"model": 2, "seq": 4} and r["evicted"] == (spec != "full")
    # [B, 3, C, ...] leaves 1/4 (seq; heads replicated over model), the two rows' lengths whole
    assert r["per_device"] == (r["cache_bytes"] - 2 * 4) // 4 + 2 * 4


