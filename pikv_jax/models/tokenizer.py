"""Tokenizer wrapper over the `tokenizers` package, built from a GGUF's embedded vocabulary or a
Hugging Face `tokenizer.json`, with the model's chat template rendered by jinja2."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's `tokenizer.ggml.pre` names -> pre-tokenizer. Regexes as published by each model family.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str):
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("gpt2", "default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        pattern = _LLAMA3_PATTERN
    elif pre in ("qwen2", "qwen35"):
        pattern = _QWEN2_PATTERN
    else:
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; allowed: smollm, starcoder, gpt2, "
                         "default, llama-bpe, qwen2")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class Tokenizer:
    """encode/decode plus the chat template; knows whether the model wants a BOS token."""

    def __init__(self, tok: HFTokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; a BOS is prepended when the model's metadata asks for one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Renders `messages` ([{role, content}]) with the model's own template (jinja2, sandboxed)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template in its metadata; pass a plain prompt without --chat")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise ValueError(f"chat template error: {msg}")

        env.globals["raise_exception"] = raise_exception
        special = lambda i: self._tok.id_to_token(i) if i is not None else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=special(self.bos_token_id), eos_token=special(self.eos_token_id))

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_gguf_fields(cls, fields) -> "Tokenizer":
        """From a `gguf.GGUFReader`'s fields: BPE vocabulary, merges, token types and metadata."""
        def get(name, default=None):
            f = fields.get(name)
            return default if f is None else f.contents()

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model={model!r} is not supported; allowed: 'gpt2' (byte-level BPE)")
        tokens = get("tokenizer.ggml.tokens")
        merges = get("tokenizer.ggml.merges") or []
        types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = _byte_level_pre_tokenizer(get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
        user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
        tok.add_special_tokens(control)
        if user:
            tok.add_tokens(user)
        return cls(tok, bos_token_id=get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=get("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder: str) -> "Tokenizer":
        """From `tokenizer.json` (+ `tokenizer_config.json` for BOS handling and the chat template)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder!r}")
        tok = HFTokenizer.from_file(path)
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)

        def token_id(key):
            t = cfg.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            return tok.token_to_id(t) if isinstance(t, str) else None

        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # [{name, template}]
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"])
        return cls(tok, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   add_bos=bool(cfg.get("add_bos_token", False)), chat_template=tmpl)

    def save_hf_folder(self, folder: str) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (what `from_hf_folder` reads)."""
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        tok_str = lambda i: self._tok.id_to_token(i) if i is not None else None
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": tok_str(self.bos_token_id), "eos_token": tok_str(self.eos_token_id),
                       "add_bos_token": self.add_bos, "chat_template": self.chat_template}, f, indent=1)
