"""Deterministic distillation data: batch `step` is a pure function of (seed, step).

So a run resumed at step s sees exactly the batches an uninterrupted run sees, with no data-loader
state to checkpoint. Held-out batches come from a disjoint split (text) or a disjoint seed stream.

Every batch is a dict of numpy arrays:
    tokens i32[B, T] (right-padded), lengths i32[B], mask f32[B, T] (positions that are scored),
    labels i32[B, T] (the next token of each position; the last real position is not scored by it).

Sources:
- text: windows of the shipped texts (pikv_jax/data) or given files; each file's last
  `heldout_fraction` of paragraphs is held out (the split of pikv_jax.eval.passkey.split_heldout).
  Random offsets per (seed, step); a BOS token starts each window when the tokenizer has one.
- random: uniform token ids in [3, vocab) (random-weight models).
- passkey: a long context with a hidden key, then the question and the answer; only the question and
  answer are scored (DuoAttention's training data). With a tokenizer: the passkey harness's contexts
  (pikv_jax/eval/passkey.py) over the shipped haystacks; without one: random ids with a planted
  `key_len`-token key and, at the end, the key again (its first half a cue, its second half the answer).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Sequence

import numpy as np

from pikv_jax.eval.passkey import CharCodec, TokenizerCodec, build_case, make_haystack, question_text, split_heldout

HELDOUT_STREAM = 1_000_003  # seed offset of held-out batches (never a training step)


def read_text(name: str) -> str:
    """A shipped text (a file name inside pikv_jax/data) or a path."""
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return f.read()
    res = importlib.resources.files("pikv_jax.data").joinpath(name)
    if res.is_file():
        return res.read_text(encoding="utf-8")
    raise FileNotFoundError(f"text file {name!r} not found (neither a path nor a file in pikv_jax/data)")


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """(train, held-out) by whole paragraphs; a text without paragraphs is split by characters."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) >= 2:
        return split_heldout(text, heldout_fraction)
    cut = int(len(text) * (1 - heldout_fraction))
    return text[:cut], text[cut:]


@dataclasses.dataclass(frozen=True)
class Batches:
    """Training batch `batch(step)` and held-out batches for one data configuration."""

    source: str
    seq_len: int
    batch_size: int
    seed: int
    prefix_len: int = 0
    vocab_size: int = 0
    bos: int | None = None
    train_ids: np.ndarray | None = None
    heldout_ids: np.ndarray | None = None
    codec: object = None
    haystacks: tuple = ()
    key_len: int = 8

    # ------------------------------------------------------------------ public

    def batch(self, step: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        return self._make(np.random.default_rng([self.seed, int(step)]), batch_size or self.batch_size, heldout=False,
                          index=int(step))

    def heldout(self, num_batches: int, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
        bs = batch_size or self.batch_size
        return [self._make(np.random.default_rng([self.seed, HELDOUT_STREAM, i]), bs, heldout=True, index=i)
                for i in range(num_batches)]

    def stream(self, stream: int, batch_size: int) -> dict[str, np.ndarray]:
        """A training-split batch from an independent seed stream (e.g. calibration data)."""
        return self._make(np.random.default_rng([self.seed, int(stream)]), batch_size, heldout=False, index=0)

    # ------------------------------------------------------------------ sources

    def _make(self, rng, bs: int, *, heldout: bool, index: int):
        if self.source == "text":
            rows = self._text_rows(rng, bs, heldout, index)
            return finish(rows, self.seq_len, score_from=self.prefix_len)
        if self.source == "random":
            rows = [rng.integers(3, self.vocab_size, self.seq_len).tolist() for _ in range(bs)]
            return finish(rows, self.seq_len, score_from=self.prefix_len)
        if self.source == "passkey":
            rows, starts = zip(*(self._passkey_row(rng) for _ in range(bs)))
            return finish(list(rows), self.seq_len, score_starts=list(starts))
        raise ValueError(f"unknown data source {self.source!r}")

    def _text_rows(self, rng, bs: int, heldout: bool, index: int):
        ids = self.heldout_ids if heldout else self.train_ids
        body = self.seq_len - (self.bos is not None)
        if len(ids) < body + 1:
            raise ValueError(f"the {'held-out' if heldout else 'training'} text has {len(ids)} tokens, fewer than "
                             f"data.seq_len={self.seq_len}: add text (data.text_files) or shorten seq_len")
        if heldout:  # evenly spread, reproducible windows, independent of the batch count
            span = len(ids) - body
            offs = [int((index * bs + r) * 0.6180339887 * span) % (span + 1) for r in range(bs)]
        else:
            offs = rng.integers(0, len(ids) - body + 1, bs).tolist()
        lead = [self.bos] if self.bos is not None else []
        return [lead + ids[o:o + body].tolist() for o in offs]

    def _passkey_row(self, rng):
        if self.codec is None:
            return planted_passkey_row(rng, self.seq_len, self.vocab_size, self.key_len)

        stack = self.haystacks[int(rng.integers(len(self.haystacks)))]
        depth = float(rng.uniform(0.0, 1.0))
        seed = int(rng.integers(0, 2**31 - 1))
        question = self.codec.encode(question_text(None))
        answer_len = len(self.codec.encode(" 12345."))  # keys are 5-digit numbers
        context_len = self.seq_len - len(question) - answer_len - (self.bos is not None)
        case = build_case(self.codec, stack, context_len, depth, seed)
        answer = self.codec.encode(" " + case.answer + ".")
        lead = [self.bos] if self.bos is not None else []
        row = lead + list(case.context) + list(case.question) + answer
        return row[: self.seq_len], len(lead) + len(case.context)


def planted_passkey_row(rng, seq_len: int, vocab_size: int, key_len: int):
    """Random ids in [3, vocab) with a `key_len`-token key at a random depth, and the whole key again at
    the end. Returns (row, first scored index): the repeated key's second half is the answer."""
    row = rng.integers(3, vocab_size, seq_len)
    key = rng.integers(3, vocab_size, key_len)
    end = seq_len - key_len
    at = int(rng.integers(1, max(2, end - key_len)))
    row[at:at + key_len] = key
    row[end:] = key
    return row.tolist(), end + key_len // 2 - 1


def finish(rows: Sequence[Sequence[int]], seq_len: int, *, score_from: int = 0, score_starts=None):
    """Pads rows to seq_len and builds lengths, mask and next-token labels."""
    b = len(rows)
    tokens = np.zeros((b, seq_len), np.int32)
    lengths = np.zeros((b,), np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    labels = np.zeros((b, seq_len), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:seq_len]
        n = len(r)
        tokens[i, :n] = r
        lengths[i] = n
        labels[i, : n - 1] = r[1:]
        start = score_from if score_starts is None else score_starts[i]
        mask[i, start: n - 1] = 1.0  # the last real token has no next token to predict
    return {"tokens": tokens, "lengths": lengths, "mask": mask, "labels": labels}


def make_batches(data_cfg, *, task: str, seed: int, vocab_size: int, tokenizer=None) -> Batches:
    """Batches for a DataSection (pikv_jax/train/config.py) and a model (its vocabulary, tokenizer)."""
    source = data_cfg.source
    if source == "auto":
        source = "passkey" if task == "duo" else "text"
    common = dict(source=source, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, seed=seed,
                  prefix_len=data_cfg.prefix_len, vocab_size=vocab_size, key_len=data_cfg.key_len)
    if source == "random":
        return Batches(**common)

    codec = TokenizerCodec(tokenizer) if tokenizer is not None else None
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    if source == "passkey":
        if codec is None:  # random-weight model: planted random-id keys
            return Batches(**common)
        stacks = tuple(make_haystack(codec, h) for h in data_cfg.haystacks)
        return Batches(**common, bos=bos, codec=codec, haystacks=stacks)
    enc = codec if codec is not None else CharCodec(vocab_size)
    train, held = [], []
    for name in data_cfg.text_files:
        a, b = split_text(read_text(name), data_cfg.heldout_fraction)
        train += enc.encode(" ".join(a.split()))
        held += enc.encode(" ".join(b.split()))
    return Batches(**common, bos=bos, train_ids=np.asarray(train, np.int32), heldout_ids=np.asarray(held, np.int32))


__all__ = ["Batches", "finish", "make_batches", "planted_passkey_row", "read_text", "split_text"]
