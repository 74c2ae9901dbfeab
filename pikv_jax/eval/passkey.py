"""Passkey / needle-in-a-haystack retrieval under a cache policy.

A case is a context of exactly `context_len` tokens: a short instruction, haystack text (the
repetitive filler or the varied prose shipped in `pikv_jax/data`) and one or more needles ("The pass
key is 48213. Remember it. 48213 is the pass key."), the target needle placed at `depth` (0 = right
after the instruction, 1 = right before the question), snapped to the nearest sentence end. Keys
are random 5-digit numbers drawn from (seed, context, depth, keys); a multi-key case hides
`n_keys` keys with different labels ("the pass key for the red door") and asks for one.

The question is a plain completion ("... What is the pass key? The pass key is"), so greedy decoding
of a few tokens answers it; the metric is substring match of the key's digits in the output.

Two modes:
  query_aware     the question is part of the prompt the policy compresses;
  query_agnostic  the policy compresses the context alone, then the question is fed (as a
                  `suffix` through the decode path) and the answer generated.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from typing import Callable, Sequence

import numpy as np

MODES = ("query_aware", "query_agnostic")
HAYSTACKS = {"repetitive": "haystack_repetitive.txt", "varied": "haystack_varied.txt"}
LABELS = ("red door", "blue door", "green door", "old bridge", "north gate", "east tower", "west gate",
          "south tower", "iron gate", "front door", "back door", "side gate")
INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will ask you about the pass key later.")
INSTRUCTION_MULTI = ("There are several pass keys hidden inside a lot of irrelevant text. Find them and "
                     "memorize them. I will ask you about one of the pass keys later.")


# ---------------------------------------------------------------------------------------------- text

class CharCodec:
    """A character-level stand-in tokenizer for models without one (random test models): printable
    ASCII maps to ids 3.. (0-2 are left for padding / BOS / EOS); other characters become '?'."""

    FIRST = 3

    def __init__(self, vocab_size: int):
        self.chars = [chr(c) for c in range(32, 127)][: max(0, vocab_size - self.FIRST)]
        if len(self.chars) < 64:
            raise ValueError(f"CharCodec needs vocab_size >= {self.FIRST + 64}, got {vocab_size}")
        self.index = {c: i + self.FIRST for i, c in enumerate(self.chars)}
        self.unknown = self.index.get("?", self.FIRST)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(" " if c == "\n" else c, self.unknown) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i - self.FIRST] for i in map(int, ids) if self.FIRST <= i < self.FIRST + n)


class TokenizerCodec:
    """encode/decode through the model's tokenizer (no BOS added: contexts are spliced together)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def codec_for(model):
    """The model's tokenizer, or a CharCodec when it has none (token-id prompts)."""
    if getattr(model, "tokenizer", None) is not None:
        return TokenizerCodec(model.tokenizer)
    return CharCodec(model.config.vocab_size)


def haystack_text(name: str) -> str:
    """Text of a shipped haystack ("repetitive", "varied") or of a file path."""
    if name in HAYSTACKS:
        return importlib.resources.files("pikv_jax.data").joinpath(HAYSTACKS[name]).read_text(encoding="utf-8")
    if os.path.exists(name):
        with open(name, encoding="utf-8") as f:
            return f.read()
    raise ValueError(f"unknown haystack {name!r}; allowed: {sorted(HAYSTACKS)} or a text file path")


def split_heldout(text: str, heldout_fraction: float = 0.35) -> tuple[str, str]:
    """(haystack part, held-out part): whole paragraphs, the last ~`heldout_fraction` of the words
    held out for perplexity so passkey contexts and scored text never overlap."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paras) < 2:
        return text, text
    words = np.cumsum([len(p.split()) for p in paras])
    cut = int(np.searchsorted(words, (1 - heldout_fraction) * words[-1]))
    cut = min(max(cut, 1), len(paras) - 1)
    return "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])


@dataclasses.dataclass(frozen=True)
class Haystack:
    """Token ids of a haystack and, per token, whether a needle may go before it (sentence start)."""

    name: str
    ids: tuple[int, ...]
    starts: tuple[bool, ...]


def make_haystack(codec, name: str, *, text: str | None = None) -> Haystack:
    """Tokenizes a haystack; for the varied text only its passkey part (see `split_heldout`)."""
    text = haystack_text(name) if text is None else text
    if name == "varied" or "\n\n" in text:
        text = split_heldout(text)[0]
    text = " ".join(text.split())  # one paragraph: spliced contexts never start mid-line
    ids = codec.encode(text)
    if len(ids) < 16:
        raise ValueError(f"haystack {name!r} is too short ({len(ids)} tokens)")
    starts = [True]
    for i in range(1, len(ids)):
        starts.append(codec.decode([ids[i - 1]]).rstrip().endswith((".", "!", "?")))
    return Haystack(name=name, ids=tuple(ids), starts=tuple(starts))


# ---------------------------------------------------------------------------------------------- cases

class PromptCase:
    """What passkey and RULER cases share: `context` and `question` token ids (fields of the
    dataclasses below) and the prompts built from them."""

    context: tuple[int, ...]
    question: tuple[int, ...]

    @property
    def context_len(self) -> int:
        return len(self.context)

    @property
    def prompt(self) -> list[int]:
        """The query-aware prompt: context followed by the question."""
        return list(self.context) + list(self.question)


@dataclasses.dataclass(frozen=True)
class PasskeyCase(PromptCase):
    """One retrieval prompt. `context` has exactly `context_len` ids; `answer` is the key's digits.

    depth: requested depth of the target needle; actual_depth: where it landed after snapping to a
    sentence start (fraction of the haystack body before it); needle_start: its first token index.
    """

    context: tuple[int, ...]
    question: tuple[int, ...]
    answer: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    depth: float
    actual_depth: float
    needle_start: int
    needle_len: int
    seed: int
    haystack: str
    n_keys: int

    def meta(self) -> dict:
        return dict(context=self.context_len, depth=self.depth, actual_depth=round(self.actual_depth, 4),
                    seed=self.seed, haystack=self.haystack, n_keys=self.n_keys, answer=self.answer)


def needle_text(key: str, label: str | None) -> str:
    if label is None:
        return f" The pass key is {key}. Remember it. {key} is the pass key."
    return f" The pass key for the {label} is {key}. Remember it. {key} is the pass key for the {label}."


def question_text(label: str | None) -> str:
    if label is None:
        return " What is the pass key? The pass key is"
    return f" What is the pass key for the {label}? The pass key for the {label} is"


@functools.lru_cache(maxsize=None)
def _uniform_labels(codec) -> tuple[str, ...]:
    """Labels whose question has the most common token length, so that every multi-key question
    (and thus the query-agnostic suffix) has one shape: one compile per method."""
    lengths = {lab: len(codec.encode(question_text(lab))) for lab in LABELS}
    common = max(set(lengths.values()), key=lambda n: (sum(v == n for v in lengths.values()), -n))
    return tuple(lab for lab in LABELS if lengths[lab] == common)


def insertion_point(target: int, starts: Sequence[bool], *, snap: bool = True) -> int:
    """Index in [0, len(starts)] closest to `target` where a sentence starts (`starts[i]`, or the
    end). Ties go to the earlier index. Without `snap`, `target` itself."""
    n = len(starts)
    target = int(min(max(target, 0), n))
    if not snap:
        return target
    for delta in range(n + 1):
        for i in (target - delta, target + delta):
            if 0 <= i <= n and (i == n or i == 0 or starts[i]):
                return i
    return target


def haystack_body(haystack: Haystack, body_len: int, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
    """`body_len` haystack token ids from a seeded sentence start (wrapping around the text) and,
    per token, whether a sentence starts there."""
    sentence_starts = [i for i, s in enumerate(haystack.starts) if s] or [0]
    offset = int(rng.choice(sentence_starts))
    idx = (offset + np.arange(body_len)) % len(haystack.ids)
    return [haystack.ids[i] for i in idx], [haystack.starts[i] for i in idx]


def splice(pre: Sequence[int], body: Sequence[int], starts: Sequence[bool], pieces: Sequence[Sequence[int]],
           depths: Sequence[float], *, snap: bool = True) -> tuple[list[int], list[int], list[int]]:
    """`pre` + `body` with piece j inserted at depth j of the body (snapped to a sentence start);
    returns (context ids, first index of each piece in the context, insertion point of each piece in
    the body). Pieces at the same point keep their order."""
    points = [insertion_point(int(round(d * len(body))), starts, snap=snap) for d in depths]
    context, prev, piece_starts = list(pre), 0, [0] * len(pieces)
    for j in sorted(range(len(pieces)), key=lambda j: (points[j], j)):
        context += body[prev: points[j]]
        prev = points[j]
        piece_starts[j] = len(context)
        context += pieces[j]
    context += body[prev:]
    return context, piece_starts, points


def build_case(codec, haystack: Haystack, context_len: int, depth: float, seed: int, *, n_keys: int = 1,
               instruction: bool = True, snap: bool = True) -> PasskeyCase:
    """A context of exactly `context_len` tokens with the target needle at `depth` (see module)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_keys < 1 or n_keys > len(LABELS):
        raise ValueError(f"n_keys must be in [1, {len(LABELS)}], got {n_keys}")
    rng = np.random.default_rng([int(seed), int(context_len), int(round(depth * 1000)), int(n_keys)])
    keys = [str(k) for k in rng.choice(np.arange(10000, 100000), size=n_keys, replace=False)]
    if n_keys == 1:
        labels: list[str | None] = [None]
    else:
        pool = _uniform_labels(codec)
        if len(pool) < n_keys:
            pool = LABELS
        labels = [str(x) for x in rng.choice(pool, size=n_keys, replace=False)]
    pre = codec.encode((INSTRUCTION if n_keys == 1 else INSTRUCTION_MULTI)) if instruction else []
    needles = [codec.encode(needle_text(k, lab)) for k, lab in zip(keys, labels)]
    body_len = context_len - len(pre) - sum(len(n) for n in needles)
    if body_len < 1:
        raise ValueError(f"context_len={context_len} is too short for the instruction and {n_keys} needle(s) "
                         f"({context_len - body_len} tokens)")
    body, starts = haystack_body(haystack, body_len, rng)
    # target at `depth`; the other needles at random depths
    depths = [depth] + [float(x) for x in rng.uniform(0, 1, size=n_keys - 1)]
    context, piece_starts, points = splice(pre, body, starts, needles, depths, snap=snap)
    target_start = piece_starts[0]
    assert len(context) == context_len, (len(context), context_len)
    return PasskeyCase(context=tuple(context), question=tuple(codec.encode(question_text(labels[0]))),
                       answer=keys[0], keys=tuple(keys), labels=tuple(lab or "" for lab in labels), depth=float(depth),
                       actual_depth=points[0] / body_len, needle_start=target_start, needle_len=len(needles[0]),
                       seed=int(seed), haystack=haystack.name, n_keys=n_keys)


def build_cases(codec, *, contexts: Sequence[int], depths: Sequence[float], seeds: Sequence[int],
                haystacks: Sequence[str], keys: Sequence[int] = (1,)) -> list[PasskeyCase]:
    stacks = {h: make_haystack(codec, h) for h in haystacks}
    return [build_case(codec, stacks[h], c, d, s, n_keys=k)
            for c in contexts for h in haystacks for k in keys for s in seeds for d in depths]


def score_answer(output: str, answer: str) -> bool:
    """Substring match of the key's digits in the generated text."""
    return str(answer) in output


# ---------------------------------------------------------------------------------------------- running

def kept_bytes_per_row(stats: dict, config) -> float:
    """Bytes the kept tokens of one row would take in a bf16 K+V cache (a policy or compressed
    cache that reports `kept_bytes` itself is taken at its word)."""
    batch = max(int(stats.get("batch", 1)), 1)
    if "kept_bytes" in stats:
        return float(stats["kept_bytes"]) / batch
    per_token = config.num_hidden_layers * config.num_key_value_heads * config.dim_per_head * 2 * 2
    return float(stats["kept_tokens"]) / batch * per_token


def stats_record(stats: dict, config) -> dict:
    """Per-row byte and speed numbers from `PiKVModel.get_stats()`."""
    batch = max(int(stats.get("batch", 1)), 1)
    return dict(kept_tokens=float(stats["kept_tokens"]) / batch,
                kept_bytes=kept_bytes_per_row(stats, config),
                cache_bytes=float(stats["cache_bytes"]) / batch,
                full_cache_bytes=float(stats["full_cache_bytes"]) / batch,
                decode_ms_per_token=float(stats["decode_ms_per_token"]),
                prefill_tokens_per_s=float(stats["prefill_tokens_per_s"]),
                compile_s=float(stats.get("compile_s", 0.0)))


def _batches(cases: list[PasskeyCase], batch_size: int):
    """Batches of cases with one context length (questions of different lengths are padded per
    row by `generate`, whose rows are independent); the last batch of a group is padded with copies
    of its last case so every batch of a context has one shape (one compile per context)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.context_len, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            pad = [chunk[-1]] * (batch_size - len(chunk)) if len(idx) > batch_size else []
            yield chunk, pad


def count_calls(cases, batch_size: int) -> int:
    return sum(1 for _ in _batches(list(cases), batch_size))


def run_cases(model, methods, cases: Sequence, *, score: Callable[[object, str], dict], modes: Sequence[str] = MODES,
              max_new_tokens: int = 8, batch_size: int = 1, codec=None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Generates an answer for every (method, mode, case); returns one record per case: method,
    mode, `case.meta()`, the output text, `score(case, text)` and the per-row cache/speed stats.

    Cases need `context`, `question`, `prompt`, `context_len` and `meta()` (a PasskeyCase or a
    ruler.RulerCase). progress(desc) is called after each generate call.
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r}; allowed: {', '.join(MODES)}")
    cases = list(cases)
    codec = codec or codec_for(model)
    records = []
    for method in methods:
        for mode in modes:
            for chunk, pad in _batches(cases, batch_size):
                rows = [cases[i] for i in chunk + pad]
                if mode == "query_aware":
                    out = model.generate([c.prompt for c in rows], max_new_tokens, policy=method.policy)
                else:
                    out = model.generate([list(c.context) for c in rows], max_new_tokens, policy=method.policy,
                                         suffixes=[list(c.question) for c in rows])
                st = stats_record(out.stats, model.config)
                for j, case in enumerate(rows[: len(chunk)]):
                    text = out.texts[j] if model.tokenizer is not None else codec.decode(out.token_ids[j])
                    records.append(dict(method=method.label, mode=mode, **case.meta(), output=text,
                                        **score(case, text), **st))
                if progress:
                    progress(f"{method.label} {mode}")
    return records


def run_passkey(model, methods, cases: list[PasskeyCase], *, modes: Sequence[str] = MODES,
                max_new_tokens: int = 8, batch_size: int = 1, codec=None,
                progress: Callable[[str], None] | None = None) -> list[dict]:
    """Generates an answer for every (method, mode, case); returns one record per case with
    `correct` = the key's digits appear in the output.

    methods: parsed `Method`s. progress(desc) is called after each generate call.
    """
    return run_cases(model, methods, cases, score=lambda case, text: dict(correct=score_answer(text, case.answer)),
                     modes=modes, max_new_tokens=max_new_tokens, batch_size=batch_size, codec=codec,
                     progress=progress)


def summarize(records: list[dict], keys: Sequence[str] = ("method", "mode", "context"), *,
              metric: str = "correct") -> list[dict]:
    """Accuracy (the mean of each record's `metric`) and mean bytes/speed per group of `keys`
    (records in first-seen order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for k, rs in groups.items():
        row = dict(zip(keys, k))
        row.update(n=len(rs), accuracy=float(np.mean([float(r[metric]) for r in rs])))
        for f in ("kept_tokens", "kept_bytes", "cache_bytes", "full_cache_bytes", "decode_ms_per_token"):
            row[f] = float(np.mean([r[f] for r in rs]))
        row["kept_fraction"] = row["kept_bytes"] / row["full_cache_bytes"] if row["full_cache_bytes"] else float("nan")
        out.append(row)
    return out


__all__ = ["CharCodec", "Haystack", "MODES", "PasskeyCase", "TokenizerCodec", "build_case", "build_cases",
           "codec_for", "count_calls", "haystack_body", "haystack_text", "insertion_point", "make_haystack",
           "run_cases", "run_passkey", "score_answer", "splice", "split_heldout", "stats_record", "summarize"]
