"""Clear errors: each names the bad argument (or file) and what is allowed, and is raised before any
compilation or generation starts."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import numpy_reference
import pytest
from test_loaders import write_tiny_gguf
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pikv_jax.api import PiKVModel
from pikv_jax.config import tiny_config
from pikv_jax.models.gguf_loader import load_gguf
from pikv_jax.models.hf_loader import save_hf_folder
from pikv_jax.models.registry import bundled_model_path
from pikv_jax.models.tokenizer import Tokenizer
from pikv_jax.runtime.generate import GenerationLoop
from pikv_jax.sampling import SamplingConfig


@pytest.fixture(scope="module")
def lm_with_tokenizer(tiny_lm):
    """The tiny model with a 26-letter tokenizer, for text prompts."""
    model, prompts = tiny_lm
    hf = HFTokenizer(models.BPE(vocab={chr(ord("a") + i): i for i in range(26)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tok = Tokenizer(hf, bos_token_id=None, eos_token_id=None, add_bos=False, chat_template=None)
    return PiKVModel(model.model, tok, model.config), prompts


# ------------------------------------------------------------------ model files


def test_missing_model_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        PiKVModel.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="model file not found.*nope.gguf"):
        load_gguf(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PiKVModel.from_pretrained(str(tmp_path))  # an existing folder that is no checkpoint


def test_random_bytes_are_not_a_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"random\.gguf.*not a readable GGUF"):
        PiKVModel.from_pretrained(str(path))


@pytest.mark.parametrize("keep_bytes", [8, 300_000])
def test_truncated_copy_of_the_bundled_gguf(tmp_path, keep_bytes):
    """The first bytes of a valid file: a header cut inside the magic/version, or inside the
    vocabulary's metadata."""
    with open(bundled_model_path(), "rb") as f:
        head = f.read(keep_bytes)
    assert head[:4] == b"GGUF"
    path = tmp_path / "truncated.gguf"
    path.write_bytes(head)
    with pytest.raises(ValueError, match=r"truncated\.gguf.*not a readable GGUF"):
        PiKVModel.from_pretrained(str(path))


def test_unknown_architecture_in_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12}))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*allowed"):
        PiKVModel.from_pretrained(str(tmp_path))


def test_unknown_architecture_in_gguf(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general\.architecture='gpt2'.*allowed"):
        PiKVModel.from_pretrained(str(path))


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        PiKVModel.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------ generation arguments


def test_prompt_longer_than_the_cache_capacity(tiny_lm):
    model, prompts = tiny_lm
    with pytest.raises(ValueError, match=r"11 tokens.*max_cache_tokens=8"):
        model.generate(prompts, 4, max_cache_tokens=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_new_tokens_below_one_or_not_an_integer(tiny_lm, bad):
    model, prompts = tiny_lm
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompts, bad)


def test_generation_loop_validates_max_new_tokens(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationLoop(graphdef=model.graphdef, policy=model.policy, sampling=SamplingConfig(), max_new_tokens=0,
                       stop_ids=())


def test_empty_prompts(lm_with_tokenizer):
    model, prompts = lm_with_tokenizer
    assert model.encode("abc") == [0, 1, 2]  # the tokenizer works: only emptiness is rejected
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate("", 4)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(["abc", ""], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([prompts[0], []], 4)
    with pytest.raises(ValueError, match="prompts is empty"):
        model.generate([], 4)


def test_text_prompt_without_a_tokenizer(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello", 4)


@pytest.mark.parametrize("kwargs,named", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_invalid_sampling_parameters(tiny_lm, kwargs, named):
    model, prompts = tiny_lm
    with pytest.raises(ValueError, match=named):
        model.generate(prompts, 4, **kwargs)
    with pytest.raises(ValueError, match=named):
        SamplingConfig(**{"temperature": 1.0, **kwargs})


@pytest.mark.parametrize("bad_id", [97, 10_000, -1])
def test_token_ids_outside_the_vocabulary(tiny_lm, bad_id):
    model, prompts = tiny_lm
    with pytest.raises(ValueError, match=rf"prompt 1 has token ids outside \[0, 97\).*{bad_id}"):
        model.generate([prompts[0], [5, bad_id, 6]], 4)


# ------------------------------------------------------------------ malformed checkpoints: API and CLI
# Each case builds a broken Hugging Face folder or GGUF file in tmp_path and gives the pattern its
# one-line error must match: the file, then the missing or bad field and what is allowed.


def _tiny_hf_folder(folder, *, drop=(), reshape=None, config=None):
    """A loadable tiny Llama folder, then broken: tensors dropped or reshaped, config.json rewritten."""
    cfg = tiny_config("llama")
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=0)
    weights = {k: v for k, v in weights.items() if k not in drop}
    if reshape:
        weights[reshape[0]] = np.zeros(reshape[1], np.float32)
    save_hf_folder(str(folder), cfg, weights)
    if config is not None:
        (folder / "config.json").write_text(config(cfg.to_hf_dict()))
    return folder


def _without(*keys):
    return lambda d: json.dumps({k: v for k, v in d.items() if k not in keys})


def _tiny_gguf(path, *, drop=(), rename=None, keep_bytes=None):
    """A loadable tiny Llama GGUF, then broken: tensors dropped, a metadata key renamed (same length,
    so the file stays readable), or the file cut to its first `keep_bytes` bytes."""
    cfg = tiny_config("llama", vocab_size=40)
    weights = numpy_reference.random_weights(cfg.to_hf_dict(), seed=0)
    write_tiny_gguf(path, cfg, {k: v for k, v in weights.items() if k not in drop})
    data = path.read_bytes()
    if rename:
        assert len(rename[0]) == len(rename[1]) and data.count(rename[0]) == 1
        data = data.replace(rename[0], rename[1])
    path.write_bytes(data[:keep_bytes] if keep_bytes is not None else data)
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _without_file(folder, name):
    (folder / name).unlink()
    return folder


MALFORMED = {
    # Hugging Face folders
    "config_without_num_attention_heads": (
        lambda t: _tiny_hf_folder(t / "hf", config=_without("num_attention_heads")),
        r"hf/config\.json: required field 'num_attention_heads' is missing; expected an integer >= 1"),
    "config_without_hidden_size": (
        lambda t: _tiny_hf_folder(t / "hf", config=_without("hidden_size")),
        r"hf/config\.json: required field 'hidden_size' is missing; expected an integer >= 1"),
    "config_without_vocab_size": (
        lambda t: _tiny_hf_folder(t / "hf", config=_without("vocab_size")),
        r"hf/config\.json: required field 'vocab_size' is missing; expected an integer >= 1"),
    "config_with_a_string_for_a_number": (
        lambda t: _tiny_hf_folder(t / "hf", config=lambda d: json.dumps(dict(d, hidden_size="64"))),
        r"hf/config\.json: field 'hidden_size' must be an integer, got '64'"),
    "config_with_zero_heads": (
        lambda t: _tiny_hf_folder(t / "hf", config=lambda d: json.dumps(dict(d, num_attention_heads=0))),
        r"hf/config\.json: num_attention_heads must be >= 1, got 0"),
    "config_that_is_not_json": (
        lambda t: _tiny_hf_folder(t / "hf", config=lambda d: "{not json"),
        r"hf/config\.json: not a readable JSON file \(JSONDecodeError"),
    "config_that_is_a_json_list": (
        lambda t: _tiny_hf_folder(t / "hf", config=lambda d: "[]"),
        r"hf/config\.json: must hold a JSON object"),
    "config_without_weights": (
        lambda t: _without_file(_tiny_hf_folder(t / "hf"), "model.safetensors"),
        r"no weights in '.*hf': expected model\.safetensors or model\.safetensors\.index\.json"),
    "safetensors_missing_a_tensor": (
        lambda t: _tiny_hf_folder(t / "hf", drop=("model.layers.1.self_attn.k_proj.weight",)),
        r"hf/model\.safetensors: missing tensors for architecture 'llama': \['model\.layers\.1\.self_attn\.k_proj"),
    "safetensors_with_a_wrong_shape": (
        lambda t: _tiny_hf_folder(t / "hf", reshape=("model.layers.0.mlp.up_proj.weight", (96, 63))),
        r"hf/model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \(96, 63\), "
        r"expected \(96, 64\)"),
    "safetensors_that_is_not_safetensors": (
        lambda t: _write(_tiny_hf_folder(t / "hf") / "model.safetensors", b"\x00" * 64).parent,
        r"hf/model\.safetensors: not a readable safetensors file"),
    "index_without_weight_map": (
        lambda t: _write(_tiny_hf_folder(t / "hf") / "model.safetensors.index.json", b'{"metadata": {}}').parent,
        r"hf/model\.safetensors\.index\.json: field 'weight_map' is missing or empty"),
    # GGUF files
    "gguf_truncated_in_its_tensors": (
        lambda t: _tiny_gguf(t / "cut.gguf", keep_bytes=20_000),
        r"cut\.gguf: not a readable GGUF file, truncated or corrupt"),
    "gguf_truncated_in_its_header": (
        lambda t: _tiny_gguf(t / "cut.gguf", keep_bytes=6),
        r"cut\.gguf: not a readable GGUF file, truncated or corrupt"),
    "gguf_that_is_text": (
        lambda t: _write(t / "text.gguf", b"this is not a model\n" * 50),
        r"text\.gguf: not a readable GGUF file: it starts with b'this', a GGUF file starts with b'GGUF'"),
    "gguf_that_is_empty": (
        lambda t: _write(t / "empty.gguf", b""),
        r"empty\.gguf: not a readable GGUF file: .*\(the file is empty\)"),
    "gguf_without_architecture": (
        lambda t: _tiny_gguf(t / "noarch.gguf", rename=(b"general.architecture", b"general.architecturX")),
        r"noarch\.gguf: GGUF metadata key 'general\.architecture' is missing; allowed: \['llama'"),
    "gguf_without_block_count": (
        lambda t: _tiny_gguf(t / "nolayers.gguf", rename=(b"llama.block_count", b"llama.block_counX")),
        r"nolayers\.gguf: GGUF metadata key 'llama\.block_count' is missing; expected an integer >= 1"),
    "gguf_missing_a_tensor": (
        lambda t: _tiny_gguf(t / "notensor.gguf", drop=("model.layers.0.mlp.down_proj.weight",)),
        r"notensor\.gguf: missing tensors for architecture 'llama': \['model\.layers\.0\.mlp\.down_proj"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_raises_one_line_value_error(tmp_path, case):
    build, pattern = MALFORMED[case]
    path = build(tmp_path)
    with pytest.raises(ValueError, match=pattern) as e:
        PiKVModel.from_pretrained(str(path))
    assert "\n" not in str(e.value)


def _pikv(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "pikv_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("case", ["config_without_num_attention_heads", "config_that_is_not_json",
                                  "config_without_weights", "safetensors_missing_a_tensor",
                                  "safetensors_with_a_wrong_shape", "gguf_truncated_in_its_tensors",
                                  "gguf_that_is_text", "gguf_without_architecture"])
def test_cli_prints_one_error_line_for_a_malformed_checkpoint(tmp_path, case):
    """`pikv generate --model BROKEN` exits non-zero with one `pikv: error:` line and no traceback; the
    other stderr lines are `[pikv] ...` progress (loading, and the tensor count when the files read)."""
    build, pattern = MALFORMED[case]
    proc = _pikv("generate", "--model", str(build(tmp_path)), "--prompt", "hi")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    # progress lines start with "\r" (a live line on a terminal), which splitlines() separates
    errors = [line for line in proc.stderr.splitlines() if line and not line.startswith("[pikv] ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("pikv: error: ") and re.search(pattern, errors[0]), errors[0]
