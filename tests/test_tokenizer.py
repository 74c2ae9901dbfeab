"""The tokenizer built from the GGUF's embedded vocabulary reproduces transformers' input_ids for the
golden texts, decodes them back, and renders SmolLM2's chat template like transformers did."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_encodes_golden_texts_to_recorded_ids(smollm2, reference):
    tok = smollm2.tokenizer
    for name, p in reference["prompts"].items():
        assert tok.encode(p["text"]) == p["input_ids"], name


def test_decodes_recorded_ids_back_to_text(smollm2, reference):
    tok = smollm2.tokenizer
    for name, p in reference["prompts"].items():
        assert tok.decode(p["input_ids"], skip_special_tokens=False) == p["text"], name
        assert tok.decode(p["greedy24_ids"], skip_special_tokens=False) == p["greedy24_text"], name
    # special tokens are dropped by default (what generation prints)
    chat = reference["prompts"]["chat"]
    assert "<|im_start|>" not in tok.decode(chat["input_ids"])
    assert tok.decode(chat["greedy24_ids"]) == chat["greedy24_text"].replace("<|im_end|>", "")


def test_no_bos_and_special_ids_follow_the_metadata(smollm2, reference):
    tok = smollm2.tokenizer
    assert not tok.add_bos  # the GGUF says add_bos_token = false; transformers' ids start without BOS
    assert reference["prompts"]["capital"]["input_ids"][0] != tok.bos_token_id
    assert tok.eos_token_id == 2 and tok.token_to_id("<|im_end|>") == 2
    assert tok.bos_token_id == 1 and tok.token_to_id("<|im_start|>") == 1
    assert tok.vocab_size == smollm2.config.vocab_size == 49152
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_token_id


def test_chat_template_renders_the_golden_chat_prompt(smollm2, reference):
    chat = reference["prompts"]["chat"]
    question = "What is the capital of France?"
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    assert text == chat["text"]  # the template adds SmolLM2's default system message
    assert smollm2.encode(question, chat=True) == chat["input_ids"]
    with_system = smollm2.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert smollm2.encode(question, chat=True, system="Be brief.") == smollm2.tokenizer.encode(with_system)


def test_round_trip_of_assorted_text(smollm2):
    tok = smollm2.tokenizer
    for text in ["Numbers 1234567 and 3.14159", "  leading spaces\tand\ttabs\n\nnew lines",
                 "Unicode: café, naïve, 東京, emoji 🙂", "code: def f(x):\n    return x ** 2"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # SmolLM2's pre-tokenizer splits digits one by one
    assert len(tok.encode("1234567")) == 7
