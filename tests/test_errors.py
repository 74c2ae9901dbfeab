"""Clear errors: each names the bad argument (or file) and what is allowed, and is raised before any
compilation or generation starts."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from pikv_jax.api import PiKVModel
from pikv_jax.runtime.generate import GenerationLoop
from pikv_jax.models.gguf_loader import load_gguf
from pikv_jax.models.registry import bundled_model_path
from pikv_jax.models.tokenizer import Tokenizer
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
