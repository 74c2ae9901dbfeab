"""Loading checkpoints: GGUF (Q/K un-permuting, metadata, tokenizer), Hugging Face folders (single
file and sharded index), name/shape checking, and resolution of model names and paths.

Small GGUF files are written here with the `gguf` package, Q/K permuted exactly as llama.cpp's
converter does, so the loader is checked against weights we know. SmolLM2 round trips through a
Hugging Face folder (slow) and must give the GGUF path's logits.
"""

from __future__ import annotations

import json
import os
import re

import gguf
import numpy as np
import numpy_reference
import pytest
from flax import nnx

from pikv_jax.config import tiny_config
from pikv_jax.models.gguf_loader import load_gguf, unpermute_qk
from pikv_jax.models.hf_loader import (
    INDEX_FILE,
    MissingCheckpointFile,
    load_hf_config,
    load_hf_folder,
    save_hf_folder,
    weights_source,
)
from pikv_jax.models.registry import bundled_model_path, load_pretrained, resolve
from pikv_jax.models.weights import build_model, expected_hf_names, model_to_hf_weights


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
TOKENS = [chr(ord("a") + i) for i in range(26)] + ["ab", "abc"] + [f"<s{i}>" for i in range(28, 40)]


def write_tiny_gguf(path, cfg, weights, *, arch=None):
    """A GGUF file in llama.cpp's layout: metadata, a 40-token BPE vocabulary, weights (Q/K rows
    permuted for llama/mistral)."""
    arch = arch or cfg.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.dim_per_head)
    w.add_value_length(cfg.dim_per_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * 39 + [3])
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(39)
    w.add_eos_token_id(39)
    for name, arr in weights.items():
        if name in _GGUF_GLOBAL:
            gname = _GGUF_GLOBAL[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:])]}"
        if arch in ("llama", "mistral") and "q_proj" in name:
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif arch in ("llama", "mistral") and "k_proj" in name:
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, d in ((3, 8), (4, 64)):
        w = rng.normal(size=(n_heads * d, 10))
        b = rng.normal(size=(n_heads * d,))
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_heads), n_heads), w)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, n_heads), n_heads), b)
        assert not np.array_equal(llama_cpp_permute(w, n_heads), w)


@pytest.mark.parametrize("cfg", [
    tiny_config("llama", vocab_size=40),
    tiny_config("llama", vocab_size=40, tie_word_embeddings=True),
    tiny_config("qwen2", vocab_size=40),  # llama.cpp does not permute Qwen rows; biases
    tiny_config("qwen3", vocab_size=40, head_dim=24),
], ids=["llama", "llama_tied", "qwen2", "qwen3"])
def test_gguf_loader_recovers_config_weights_and_tokenizer(tmp_path, cfg):
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, cfg, weights)
    got_cfg, got_w, tok = load_gguf(str(path))
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "qk_norm"):
        assert getattr(got_cfg, field) == getattr(cfg, field), field
    assert got_cfg.dim_per_head == cfg.dim_per_head
    assert got_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert got_cfg.eos_token_id == 39 and got_cfg.bos_token_id == 39
    assert set(got_w) == set(weights)
    for name in weights:  # un-permuted back to Hugging Face order, bit for bit
        np.testing.assert_array_equal(got_w[name], weights[name], err_msg=name)
    # the embedded BPE vocabulary with its merges and control token
    assert tok.encode("abcab") == [27, 26] and tok.decode([27, 26]) == "abcab"
    assert tok.encode("<s39>") == [39] and tok.decode([0, 39]) == "a"
    assert not tok.add_bos and tok.eos_token_id == 39
    build_model(got_cfg, got_w)  # loadable as is


def test_hf_folder_sharded_round_trip(tmp_path, tiny_lm, stepwise):
    """A sharded folder (index + several safetensors) loads to bit-identical weights and logits."""
    model, prompts = tiny_lm
    _, run_full = stepwise
    weights = {k: np.asarray(v) for k, v in model_to_hf_weights(model.model).items()}
    largest = max(a.nbytes for a in weights.values())
    save_hf_folder(str(tmp_path), model.config, weights, max_shard_bytes=largest)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((tmp_path / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(weights) == set(expected_hf_names(model.config))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in weights.values())
    assert not (tmp_path / "model.safetensors").exists()

    loaded, tok, cfg = load_pretrained(str(tmp_path))
    assert tok is None and cfg == model.config.replace(head_dim=model.config.dim_per_head)
    got = model_to_hf_weights(loaded)
    for name in weights:
        np.testing.assert_array_equal(np.asarray(got[name]), weights[name], err_msg=name)
    gen = np.zeros((3, 2), np.int32)
    gd, params = nnx.split(loaded)
    np.testing.assert_array_equal(run_full(gd, params, prompts, gen), run_full(model.graphdef, model.params,
                                                                            prompts, gen))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_hf_folder_single_file_round_trip_per_architecture(tmp_path, arch):
    cfg = tiny_config(arch, sliding_window=6 if arch == "mistral" else None)
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=4)
    save_hf_folder(str(tmp_path), cfg, weights)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_FILE).exists()
    got_cfg, got_w, tok = load_hf_folder(str(tmp_path))
    assert got_cfg == cfg.replace(head_dim=cfg.dim_per_head) and tok is None
    assert set(got_w) == set(weights)
    for name in weights:
        np.testing.assert_array_equal(np.asarray(got_w[name]), weights[name])


def test_build_model_rejects_missing_unexpected_and_misshapen_tensors():
    cfg = tiny_config("qwen2")
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=0)
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        build_model(cfg, missing)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        build_model(cfg, dict(weights, **{"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    bad = dict(weights)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 63), np.float32)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\(96, 63\).*\(96, 64\)"):
        build_model(cfg, bad)


def test_hf_folder_errors_name_the_file(tmp_path, tiny_lm):
    model, _ = tiny_lm
    weights = {k: np.asarray(v) for k, v in model_to_hf_weights(model.model).items()}
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(str(tmp_path))
    save_hf_folder(str(tmp_path), model.config, weights, max_shard_bytes=10**9 // 2)
    shard = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]["model.norm.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf_folder(str(tmp_path))
    (tmp_path / shard).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=shard):
        load_hf_folder(str(tmp_path))


def test_resolve_names_and_paths(tmp_path):
    kind, path = resolve("smollm2")
    assert kind == "gguf" and path == bundled_model_path() and path.endswith(".gguf") and os.path.isfile(path)
    assert resolve("random:llama3-8b") == ("preset", "llama3-8b")
    assert resolve(str(tmp_path)) == ("hf", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    assert resolve(str(f)) == ("gguf", str(f))
    with pytest.raises(ValueError, match="random:nope|nope"):
        resolve("random:nope")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve(str(other))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve("no-such-model")


@pytest.mark.slow
def test_smollm2_hf_folder_loads_to_the_gguf_logits(tmp_path, smollm2, smollm2_stepwise, stepwise, reference):
    """SmolLM2's weights written as a Hugging Face folder (with tokenizer.json) load to bit-identical
    parameters; the same prompts give the same cached logits as the GGUF path."""
    run_stepwise, _ = stepwise
    weights = model_to_hf_weights(smollm2.model)
    save_hf_folder(str(tmp_path), smollm2.config, weights, smollm2.tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path))
    from pikv_jax.api import PiKVModel

    hf = PiKVModel.from_pretrained(str(tmp_path))
    assert hf.config.replace(head_dim=None) == smollm2.config.replace(head_dim=None)
    hf_weights = model_to_hf_weights(hf.model)
    assert set(hf_weights) == set(weights)
    for name in weights:
        np.testing.assert_array_equal(np.asarray(hf_weights[name]), np.asarray(weights[name]), err_msg=name)
    s = smollm2_stepwise
    # same graph (config and structure) -> the compiled function is reused
    logits, gen, _, _ = run_stepwise(smollm2.graphdef, hf.params, s["prompts"], 6, pad_to=40)
    np.testing.assert_array_equal(logits, s["logits"])
    np.testing.assert_array_equal(gen, s["generated"])
    # the tokenizer written to tokenizer.json tokenizes and decodes like the GGUF's
    for p in reference["prompts"].values():
        assert hf.tokenizer.encode(p["text"]) == p["input_ids"]
        assert hf.tokenizer.decode(p["input_ids"], skip_special_tokens=False) == p["text"]
    assert hf.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert hf.stop_ids() == smollm2.stop_ids()


def test_sharded_folder_errors_name_the_index_and_missing_files_are_value_errors(tmp_path, tiny_lm):
    """Tensors missing from a sharded folder are reported against its index file; a folder without
    weights raises an error that is both a FileNotFoundError and a ValueError."""
    model, _ = tiny_lm
    weights = {k: np.asarray(v) for k, v in model_to_hf_weights(model.model).items()}
    weights.pop("model.layers.0.mlp.gate_proj.weight")
    save_hf_folder(str(tmp_path), model.config, weights, max_shard_bytes=max(a.nbytes for a in weights.values()))
    assert weights_source(str(tmp_path)) == str(tmp_path / INDEX_FILE)
    with pytest.raises(ValueError, match=rf"{INDEX_FILE}: missing tensors .*mlp\.gate_proj\.weight"):
        load_pretrained(str(tmp_path))
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    (tmp_path / INDEX_FILE).write_text(json.dumps(dict(index, weight_map={"model.norm.weight": 3})))
    with pytest.raises(ValueError, match=rf"{INDEX_FILE}: field 'weight_map' holds 3; expected shard file names"):
        load_hf_folder(str(tmp_path))
    os.remove(tmp_path / INDEX_FILE)
    with pytest.raises(MissingCheckpointFile, match="no weights in") as e:
        load_hf_folder(str(tmp_path))
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)


def test_hf_config_field_types(tmp_path):
    """Integral floats are accepted for integer fields; booleans, strings and bad nested values are
    rejected naming the file and the field."""
    base = tiny_config("llama").to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(dict(base, hidden_size=64.0)))
    assert load_hf_config(str(tmp_path)).hidden_size == 64
    for bad, pattern in [(dict(base, num_hidden_layers=True), r"'num_hidden_layers' must be an integer, got True"),
                         (dict(base, rms_norm_eps="small"), r"'rms_norm_eps' must be a number, got 'small'"),
                         (dict(base, rope_scaling="yarn"), r"'rope_scaling' must be an object or null"),
                         (dict(base, rope_scaling={"rope_type": "yarn"}), r"rope_type='yarn' is not supported"),
                         (dict(base, num_key_value_heads=3), r"must be a multiple of num_key_value_heads=3")]:
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": .*" + pattern):
            load_hf_config(str(tmp_path))
