"""Sharded generation over a (data x model) mesh: parameter and cache placement rules, the mesh
spec helper, and (on 8 simulated CPU devices, in one subprocess: the device count must be fixed
before jax starts, and this process has one device) greedy ids equal to one device's for every
cache method, per-device cache bytes measured from the arrays' shards, and the bytes of every
collective in the compiled decode program."""

from __future__ import annotations

import pathlib

import eight_devices
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pikv_jax.api import PiKVModel
from pikv_jax.bench import collective_summary, hlo_collectives
from pikv_jax.config import tiny_config
from pikv_jax.parallel import mesh_from_spec, param_spec, parse_mesh_spec, split_counts

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "sharded_generate_checks.py"
MESH = {"data": 2, "model": 4}
B, H, D, L = 4, 8, 16, 2  # the checks' batch, query heads, head dim, layers
HLO_CAPACITY = 1024
SVD = "svd(rank=8)"
DUO = "duo_attention(n_sink=4,window=16,pattern=given)"
PER_HEAD = ["full", "streaming_llm@0.5", "h2o@0.5", "tova@0.5", "snapkv(obs_window=16)@0.5",
            "quest(dense_layers=1,page_size=8)@0.25", "int4(group_size=8,residual_length=16)",
            "h2o@0.5+int4(group_size=8,residual_length=16)", SVD]
POOLED = ["adakv(obs_window=16)@0.5", DUO]
NOT_EVICTING = {"full", "quest(dense_layers=1,page_size=8)@0.25", "int4(group_size=8,residual_length=16)", SVD}
SVD_BASES = L * 4 * 8 * D * 8 * 4  # per layer enc/dec of K and V: [Hkv=8, D, r=8] f32


# ---------------------------------------------------------------------------------- one process

def test_parse_mesh_spec_and_errors():
    assert parse_mesh_spec(" data = 2 , model=4") == {"data": 2, "model": 4}
    assert list(parse_mesh_spec("model=4,data=2")) == ["model", "data"]
    for spec, match in [("data=2,tensor=4", "mesh axis 'tensor' is unknown; allowed: data, model, expert, seq"),
                        ("data=0", "mesh axis 'data' has size 0"), ("model=-2", "mesh axis 'model' has size -2"),
                        ("data=x", "mesh axis 'data' has size 'x'"), ("data=2,data=2", "'data' is given twice"),
                        ("data2", "not axis=size"), ("", "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_mesh_spec(spec)


def test_mesh_from_spec_on_one_device():
    mesh = mesh_from_spec("data=1,model=1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"mesh data=2 x model={n} needs {2 * n} devices, only {n} available"):
        mesh_from_spec(f"data=2,model={n}")


def test_param_rules_split_whole_kv_heads_and_replicate_what_does_not_divide():
    sizes = {"data": 2, "model": 4}
    counts = split_counts(num_kv_heads=8, intermediate_size=96, vocab_size=128)
    spec = lambda path, shape, c=counts: param_spec(tuple(path.split(".")), np.zeros(shape), axis_sizes=sizes,
                                                    counts=c)
    assert spec("layers.0.self_attn.q_proj.kernel", (128, 128)) == P(None, "model")
    assert spec("layers.0.self_attn.k_proj.bias", (128,)) == P("model")
    assert spec("layers.0.self_attn.o_proj.kernel", (128, 128)) == P("model")
    assert spec("layers.0.self_attn.o_proj.bias", (128,)) == P()
    assert spec("layers.0.mlp.gate_proj.kernel", (128, 96)) == P(None, "model")
    assert spec("layers.0.mlp.down_proj.kernel", (96, 128)) == P("model")
    assert spec("embed_tokens.embedding", (128, 128)) == P("model")
    assert spec("lm_head.kernel", (128, 128)) == P(None, "model")
    assert spec("layers.0.input_layernorm.weight", (128,)) == P()
    # 2 KV heads on model=4: the whole attention block is replicated (queries included)
    two = split_counts(num_kv_heads=2, intermediate_size=96, vocab_size=128)
    assert spec("layers.0.self_attn.q_proj.kernel", (128, 128), two) == P()
    assert spec("layers.0.self_attn.o_proj.kernel", (128, 128), two) == P()
    # a vocabulary of 97 does not divide by 4: replicated, never an error
    odd = split_counts(num_kv_heads=8, intermediate_size=96, vocab_size=97)
    assert spec("embed_tokens.embedding", (97, 128), odd) == P()
    # MoE: stacked experts over `expert` when the mesh has it; a mesh without it replicates them
    assert param_spec(("layers", "0", "mlp", "experts", "gate_proj"), np.zeros((8, 4, 6)),
                      axis_sizes={"data": 2, "expert": 4}) == P("expert")
    assert spec("layers.0.mlp.experts.gate_proj", (8, 4, 6)) == P()
    assert param_spec(("experts", "down_proj_lora_b"), np.zeros((8, 2, 4))) == P("expert")  # no mesh: expert rule


def test_no_mesh_path_reports_bytes_per_device_and_no_mesh():
    model = PiKVModel.from_config(tiny_config(), seed=0)
    out = model.generate([[5, 6, 7, 8]], 3)
    assert model.mesh is None and "mesh" not in out.stats
    assert out.stats["cache_bytes_per_device"] == out.stats["cache_bytes"]


HLO = """\
%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(%x, %y)
}

%step (p: (s32[], f32[2,128])) -> (s32[], f32[2,128]) {
  %ar = (f32[2,128]{1,0}, pred[2]{0}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %ag = s32[4,8]{1,0} all-gather-start(%c), channel_id=2, dimensions={0}
}

%cond (p: (s32[], f32[2,128])) -> pred[] {
  %cp = s32[2,2]{1,0} collective-permute(%d), channel_id=3, source_target_pairs={{0,1},{1,0}}
}

ENTRY %main (a: f32[2,128]) -> f32[8,128] {
  %w = (s32[], f32[2,128]) while(%t), condition=%cond, body=%step
  %ag2 = (f32[2,128]{1,0}, f32[8,128]{1,0}) all-gather-start(%a), channel_id=4, dimensions={0}
  %rs = bf16[1,128]{1,0} reduce-scatter(%e), channel_id=5, dimensions={0}, to_apply=%add
}
"""


def test_hlo_collectives_parses_ops_bytes_and_the_loop():
    found = hlo_collectives(HLO)
    got = [(c["op"], c["bytes"], c["largest_array"], c["computation"], c["in_loop"]) for c in found]
    assert got == [("all-reduce", 2 * 128 * 4 + 2, 2 * 128 * 4, "step", True),  # a tuple: summed
                   ("all-gather", 4 * 8 * 4, 4 * 8 * 4, "step", True),
                   ("collective-permute", 16, 16, "cond", True),  # the loop condition runs every step too
                   ("all-gather", 8 * 128 * 4, 8 * 128 * 4, "main", False),  # async (input, output): the output
                   ("reduce-scatter", 256, 256, "main", False)]
    step = collective_summary([c for c in found if c["in_loop"]])
    assert step == {"count": 3, "bytes": 1026 + 128 + 16, "by_op": {
        "all-gather": {"count": 1, "bytes": 128}, "all-reduce": {"count": 1, "bytes": 1026},
        "collective-permute": {"count": 1, "bytes": 16}}}


# ---------------------------------------------------------------------------------- 8 devices

@pytest.fixture(scope="module")
def checks() -> dict:
    return eight_devices.run_checks(SCRIPT)


@pytest.mark.slow
def test_parameters_are_placed_megatron_style(checks):
    s = checks["param_specs"]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert s[f"layers.0.self_attn.{name}.kernel"] == "P(None, 'model')"
    assert s["layers.0.self_attn.o_proj.kernel"] == "P('model',)"
    assert s["layers.0.mlp.gate_proj.kernel"] == s["layers.0.mlp.up_proj.kernel"] == "P(None, 'model')"
    assert s["layers.0.mlp.down_proj.kernel"] == "P('model',)"
    assert s["embed_tokens.embedding"] == "P('model',)" and s["lm_head.kernel"] == "P(None, 'model')"
    assert s["norm.weight"] == s["layers.0.input_layernorm.weight"] == "P()"


@pytest.mark.slow
@pytest.mark.parametrize("spec", PER_HEAD + POOLED)
def test_sharded_greedy_ids_equal_single_device(checks, spec):
    r = checks["methods"][spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["finish_equal"] and r["stats_equal"] and r["mesh"] == MESH
    assert r["evicted"] == (spec not in NOT_EVICTING), "budgets must make the evicting methods evict"


@pytest.mark.slow
@pytest.mark.parametrize("spec", PER_HEAD + POOLED)
def test_cache_bytes_per_device_are_measured_from_shards(checks, spec):
    r = checks["methods"][spec]
    assert r["single_per_device"] == r["cache_bytes"]
    assert r["meta_bytes"] == (SVD_BASES if spec == SVD else 0)
    if spec in POOLED:  # a pool mixes heads: rows over data only
        assert r["per_device"] * 2 == r["cache_bytes"]
    else:  # [B, Hkv, ...] leaves: 1/2 (data) x 1/4 (model); per-row leaves (lengths, flags): 1/2;
        # leaves without a batch axis (the low-rank bases [Hkv, D, r]) are replicated
        rest = r["cache_bytes"] - r["row_bytes"] - r["meta_bytes"]
        assert r["per_device"] * 8 == rest + 4 * r["row_bytes"] + 8 * r["meta_bytes"]


@pytest.mark.slow
def test_batch_not_divisible_by_data_axis_is_padded_with_throwaway_rows(checks):
    r = checks["odd_batch"]
    assert r["equal"] and r["rows"] == r["finish"] == r["batch"] == 3
    assert r["seen"] == r["seen_expected"]
    streamed = checks["odd_batch_streamed"]  # with suffixes and a streaming callback
    assert streamed["equal"] and streamed["callbacks_equal"] and streamed["rows"] == [3] and streamed["steps"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["full", "h2o@0.5"])
def test_replicated_head_layout_when_kv_heads_do_not_divide(checks, spec):
    r = checks["replicated_head"][spec]
    assert r["equal"], (r["single"], r["sharded"])
    assert r["finish_equal"] and r["stats_equal"]
    assert r["per_device"] * 2 == r["cache_bytes"], "rows over data, heads replicated over model"
    assert checks["replicated_head_q_spec"] == "P()"
    assert checks["replicated_head_mlp_spec"] == "P(None, 'model')"


@pytest.mark.slow
def test_decode_collectives_are_activation_sized_not_cache_sized(checks):
    bound = B * H * D * L * 4
    slot_axis = (B // MESH["data"]) * HLO_CAPACITY * 4  # the smallest collective carrying a slot axis
    assert bound < slot_axis
    programs = {**checks["hlo"], **{f"{k} (replicated heads)": v for k, v in checks["hlo_replicated_head"].items()}}
    for name, r in programs.items():
        assert r["capacity"] == HLO_CAPACITY
        if name.startswith("tova"):
            continue
        assert "all-reduce" in r["ops"], f"{name}: the row-split projections need their all-reduce"
        assert r["max_bytes"] <= bound, f"{name}: {r['largest']}"
    # TOVA's score is the head mean of each slot's attention, a row-level score: its decode needs one
    # f32[B/data, C] all-reduce per layer, which the bound above catches (so the check sees slot axes)
    tova = checks["hlo"]["tova@0.5"]
    assert tova["max_bytes"] == slot_axis and "1024" in tova["largest"]["line"]


@pytest.mark.slow
def test_bad_meshes_raise_clear_errors(checks):
    e = checks["errors"]
    assert e["unknown_axis"] == "mesh axis 'tensor' is unknown; allowed: data, model, expert, seq"
    assert e["too_large"].startswith("mesh data=4 x model=4 needs 16 devices, only 8 available")
    assert e["non_positive"] == "mesh axis 'data' has size 0; sizes must be integers >= 1"
    assert "not axis=size" in e["malformed"]
    assert e["model_axis"].startswith("mesh axis 'model' of size 8 divides none of kv_heads=6, query_heads=6, "
                                      "mlp_hidden=36")
    # a seq size that does not divide an evicting budget: tests/test_seq_sharded_generate.py
