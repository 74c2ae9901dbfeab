"""RULER-style synthetic long-context tasks (after Hsieh et al., 2024), generated locally.

Seven tasks, each a context of exactly `context_len` tokens plus a completion-style question:

  niah_single        one needle "The hidden number for <key> is <value>." in haystack text; value
                     type word, number or uuid; asks for the value.
  niah_multikey      `n_keys` needles with distinct keys; asks for one key's value.
  niah_multivalue    `n_values` needles with one key and distinct values; all values asked.
  niah_multiquery    `n_queries` needles with distinct keys; all keys asked at once.
  variable_tracking  `n_chains` chains "VAR A = 12345", "VAR B = VAR A", ... (`n_hops` links each)
                     spread through filler text; asks for every variable that holds the first
                     chain's value.
  common_words       a numbered word list where `n_common` words appear `common_freq` times and
                     the others `uncommon_freq` times; asks for the common ones.
  frequent_words     made-up words with Zipf-like counts (count of rank r ~ C / r**alpha); asks
                     for the top 3.

Texts come from the haystacks shipped with the package (see `passkey.make_haystack`); words come
from their vocabulary, made-up words from seeded syllables. Everything is drawn from
`np.random.default_rng([task, seed, context_len])`, so a seed gives one case. Pieces are encoded
separately and their ids concatenated, so lengths add exactly; a context that cannot hold a task
raises a ValueError naming the argument. Metric: string-match-all (the fraction of the expected
answers found in the output, case-insensitive); `correct` when all are found. Modes and batching
are those of `passkey.run_cases` (query-aware / query-agnostic).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
import zlib
from typing import Callable, Sequence

import numpy as np

from pikv_jax.eval import passkey

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
         "common_words", "frequent_words")
VALUE_TYPES = ("word", "number", "uuid")
_KIND = {"word": "word", "number": "number", "uuid": "code"}
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


# ---------------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class RulerCase(passkey.PromptCase):
    """One task prompt. `context` has exactly the requested number of ids; `answers` are the strings
    the output must contain; `body` is the (start, end) token span of the task's material (needle
    haystack, assignment text, word list) after the instruction; `params` the task's parameters."""

    task: str
    context: tuple[int, ...]
    question: tuple[int, ...]
    answers: tuple[str, ...]
    seed: int
    body: tuple[int, int]
    params: tuple[tuple[str, object], ...] = ()

    def meta(self) -> dict:
        return dict(task=self.task, context=self.context_len, seed=self.seed, answers=list(self.answers),
                    **dict(self.params))


def _rng(task: str, seed: int, context_len: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(task.encode()), int(seed), int(context_len)])


def _check_len(context_len: int, need: int, what: str) -> None:
    if context_len < need:
        raise ValueError(f"context_len={context_len} is too short for {what}: needs >= {need} tokens")


def _fill(codec, ids: list[int], n: int) -> list[int]:
    """Pads `ids` to `n` tokens with a one-token blank (" ", else "\\n", else ".")."""
    assert len(ids) <= n, (len(ids), n)
    for piece in (" ", "\n", "."):
        pad = codec.encode(piece)
        if len(pad) == 1:
            return ids + pad * (n - len(ids))
    raise ValueError("the codec has no one-token blank to pad a context with")


@functools.lru_cache(maxsize=None)
def word_pool() -> tuple[str, ...]:
    """Lower-case words of 4-9 letters from the shipped haystacks, sorted (a fixed vocabulary)."""
    text = passkey.haystack_text("varied") + " " + passkey.haystack_text("repetitive")
    return tuple(sorted({w for w in re.findall(r"[a-z]+", text.lower()) if 4 <= len(w) <= 9}))


@functools.lru_cache(maxsize=None)
def _uniform_words(codec) -> tuple[str, ...]:
    """Pool words whose " word" has the most common token length, so that questions naming keys
    have one token length per task (one compile per method and mode)."""
    lengths = {w: len(codec.encode(" " + w)) for w in word_pool()}
    common = max(set(lengths.values()), key=lambda n: (sum(v == n for v in lengths.values()), -n))
    return tuple(w for w in word_pool() if lengths[w] == common)


@functools.lru_cache(maxsize=8)
def _haystack(codec, name: str) -> passkey.Haystack:
    return passkey.make_haystack(codec, name)


def _draw(rng: np.random.Generator, pool: Sequence[str], n: int, exclude: Sequence[str] = ()) -> list[str]:
    """`n` distinct words of `pool` not in `exclude`."""
    pool = [w for w in pool if w not in set(exclude)]
    if n > len(pool):
        raise ValueError(f"asked for {n} distinct words; the pool has {len(pool)}")
    return [str(pool[i]) for i in rng.choice(len(pool), size=n, replace=False)]


def _values(rng: np.random.Generator, value_type: str, n: int, exclude: Sequence[str]) -> list[str]:
    """`n` distinct needle values: words, 7-digit numbers or UUIDs."""
    if value_type == "word":
        return _draw(rng, word_pool(), n, exclude)
    if value_type == "number":
        return [str(v) for v in rng.choice(np.arange(1_000_000, 10_000_000), size=n, replace=False)]
    return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- needles

def _needle(kind: str, key: str, value: str) -> str:
    return f" The hidden {kind} for {key} is {value}."


def _niah(codec, context_len: int, seed: int, task: str, *, n_keys: int, n_values: int, n_asked: int,
          value_type: str, haystack: str, params: dict) -> RulerCase:
    """Needles with `n_keys` distinct keys, `n_values` values each, at seeded depths (snapped to
    sentence starts) of a haystack; the question asks for the first `n_asked` keys' values."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type={value_type!r}; allowed: {', '.join(VALUE_TYPES)}")
    rng = _rng(task, seed, context_len)
    kind = _KIND[value_type]
    keys = _draw(rng, _uniform_words(codec), n_keys)
    values = _values(rng, value_type, n_keys * n_values, exclude=keys)
    per_key = [values[i * n_values: (i + 1) * n_values] for i in range(n_keys)]
    needles = [codec.encode(_needle(kind, k, v)) for k, vs in zip(keys, per_key) for v in vs]
    asked = keys[:n_asked]
    many = n_values > 1 or n_asked > 1
    pre = codec.encode(f"Some hidden {kind}s are placed in the long text below. Memorize them; I will ask "
                       f"about them afterwards.")
    names = asked[0] if n_asked == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    noun = f"hidden {kind}{'s' if many else ''} for {names}"
    question = codec.encode(f" What {'are all the' if many else 'is the'} {noun}? The {noun} "
                            f"{'are' if many else 'is'}")
    body_len = context_len - len(pre) - sum(map(len, needles))
    _check_len(context_len, context_len - body_len + 1, f"{task} (instruction and {len(needles)} needle(s))")
    body, starts = passkey.haystack_body(_haystack(codec, haystack), body_len, rng)
    depths = [float(x) for x in rng.uniform(0, 1, size=len(needles))]
    context, _, _ = passkey.splice(pre, body, starts, needles, depths)
    answers = [v for vs in per_key[:n_asked] for v in vs]
    return RulerCase(task=task, context=tuple(context), question=tuple(question), answers=tuple(answers),
                     seed=int(seed), body=(len(pre), context_len),
                     params=tuple(dict(params, value_type=value_type, haystack=haystack, keys=tuple(keys)).items()))


def niah_single(codec, context_len: int, seed: int, *, value_type: str = "number",
                haystack: str = "varied") -> RulerCase:
    """One needle; the answer is its value."""
    return _niah(codec, context_len, seed, "niah_single", n_keys=1, n_values=1, n_asked=1, value_type=value_type,
                 haystack=haystack, params={})


def niah_multikey(codec, context_len: int, seed: int, *, n_keys: int = 4, value_type: str = "number",
                  haystack: str = "varied") -> RulerCase:
    """`n_keys` needles with distinct keys (distractors); one key asked."""
    if n_keys < 2:
        raise ValueError(f"n_keys must be >= 2, got {n_keys}")
    return _niah(codec, context_len, seed, "niah_multikey", n_keys=n_keys, n_values=1, n_asked=1,
                 value_type=value_type, haystack=haystack, params=dict(n_keys=n_keys))


def niah_multivalue(codec, context_len: int, seed: int, *, n_values: int = 4, value_type: str = "number",
                    haystack: str = "varied") -> RulerCase:
    """`n_values` needles sharing one key; every value must be returned."""
    if n_values < 2:
        raise ValueError(f"n_values must be >= 2, got {n_values}")
    return _niah(codec, context_len, seed, "niah_multivalue", n_keys=1, n_values=n_values, n_asked=1,
                 value_type=value_type, haystack=haystack, params=dict(n_values=n_values))


def niah_multiquery(codec, context_len: int, seed: int, *, n_queries: int = 4, value_type: str = "number",
                    haystack: str = "varied") -> RulerCase:
    """`n_queries` needles with distinct keys, all asked at once; every value must be returned."""
    if n_queries < 2:
        raise ValueError(f"n_queries must be >= 2, got {n_queries}")
    return _niah(codec, context_len, seed, "niah_multiquery", n_keys=n_queries, n_values=1, n_asked=n_queries,
                 value_type=value_type, haystack=haystack, params=dict(n_queries=n_queries))


# ---------------------------------------------------------------------------------------------- tracking

def _var_names(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct 5-letter upper-case names."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(chr(65 + int(i)) for i in rng.integers(0, 26, size=5))
        if name not in names:
            names.append(name)
    return names


def variable_tracking(codec, context_len: int, seed: int, *, n_chains: int = 1, n_hops: int = 4,
                      haystack: str = "repetitive") -> RulerCase:
    """Chains "VAR A = v", "VAR B = VAR A", ... (`n_hops` links after the first assignment) spread
    in order through filler text; chains interleave at random. The answer: every variable of the
    first chain (those that end up holding its value)."""
    if n_chains < 1 or n_hops < 1:
        raise ValueError(f"n_chains and n_hops must be >= 1, got {n_chains} and {n_hops}")
    rng = _rng("variable_tracking", seed, context_len)
    names = _var_names(rng, n_chains * (n_hops + 1))
    chains = [names[c * (n_hops + 1): (c + 1) * (n_hops + 1)] for c in range(n_chains)]
    values = [str(v) for v in rng.choice(np.arange(10000, 100000), size=n_chains, replace=False)]
    order = rng.permutation(np.repeat(np.arange(n_chains), n_hops + 1))  # a random merge keeping chain order
    nxt = [0] * n_chains
    statements = []
    for c in map(int, order):
        i, chain = nxt[c], chains[c]
        statements.append(f" VAR {chain[i]} = {values[c] if i == 0 else 'VAR ' + chain[i - 1]}.")
        nxt[c] += 1
    pieces = [codec.encode(s) for s in statements]
    pre = codec.encode("Memorize the variable assignments hidden in the text below; you will be asked which "
                       "variables hold a given value.")
    question = codec.encode(f" Question: which variables hold the value {values[0]}, directly or through other "
                            f"variables? Answer: the variables that hold {values[0]} are")
    body_len = context_len - len(pre) - sum(map(len, pieces))
    _check_len(context_len, context_len - body_len + 1, f"variable_tracking ({len(pieces)} assignments)")
    body, starts = passkey.haystack_body(_haystack(codec, haystack), body_len, rng)
    depths = np.sort(rng.uniform(0, 1, size=len(pieces)))
    context, _, _ = passkey.splice(pre, body, starts, pieces, [float(d) for d in depths])
    return RulerCase(task="variable_tracking", context=tuple(context), question=tuple(question),
                     answers=tuple(chains[0]), seed=int(seed), body=(len(pre), context_len),
                     params=(("n_chains", n_chains), ("n_hops", n_hops), ("haystack", haystack),
                             ("value", values[0])))


# ---------------------------------------------------------------------------------------------- word lists

def common_words(codec, context_len: int, seed: int, *, n_common: int = 10, common_freq: int | None = None,
                 uncommon_freq: int = 3) -> RulerCase:
    """A numbered list " 1. word 2. word ..." of shuffled words: `n_common` words `common_freq` times
    each, then as many other words `uncommon_freq` times each as fit; the rest is padded with
    blanks. common_freq None: about half the list, at least uncommon_freq + 2 and at most 30."""
    if n_common < 1 or uncommon_freq < 1:
        raise ValueError(f"n_common and uncommon_freq must be >= 1, got {n_common} and {uncommon_freq}")
    rng = _rng("common_words", seed, context_len)
    pre = codec.encode(f"Below is a numbered list of words. Some of them appear many times; find the {n_common} "
                       f"most common words.")
    question = codec.encode(f" Question: what are the {n_common} most common words in the list above? Answer: the "
                            f"{n_common} most common words are")
    order = [str(word_pool()[i]) for i in rng.permutation(len(word_pool()))]
    word_len = [len(codec.encode(" " + w)) for w in order]
    room = context_len - len(pre)
    num_len = functools.lru_cache(maxsize=None)(lambda i: len(codec.encode(f" {i}.")))
    if common_freq is None:  # about half the items common
        per_item = float(np.mean(word_len[:n_common])) + num_len(max(room // 4, 1))
        common_freq = int(min(30, max(uncommon_freq + 2, room / per_item / 2 / n_common)))
    if common_freq <= uncommon_freq:
        raise ValueError(f"common_freq must be > uncommon_freq ({uncommon_freq}), got {common_freq}")

    def cost(n_items: int, w: int, count: int) -> int:  # tokens of `count` more items of word w
        return sum(num_len(n_items + i + 1) for i in range(count)) + count * word_len[w]

    n_items, used = 0, 0
    for w in range(n_common):
        used += cost(n_items, w, common_freq)
        n_items += common_freq
    _check_len(context_len, len(pre) + used, f"common_words with n_common={n_common}, common_freq={common_freq}")
    n_words = n_common
    while n_words < len(order) and used + cost(n_items, n_words, uncommon_freq) <= room:
        used += cost(n_items, n_words, uncommon_freq)
        n_items += uncommon_freq
        n_words += 1
    if n_words == len(order):
        raise ValueError(f"context_len={context_len} is too long for common_words: the word pool has only "
                         f"{len(order)} words (about {len(pre) + used} tokens)")
    items = np.array(order[:n_common] * common_freq + order[n_common:n_words] * uncommon_freq)
    items = items[rng.permutation(len(items))]
    ids = list(pre)
    for i, w in enumerate(items, 1):
        ids += codec.encode(f" {i}.") + codec.encode(" " + str(w))
    end = len(ids)
    return RulerCase(task="common_words", context=tuple(_fill(codec, ids, context_len)), question=tuple(question),
                     answers=tuple(order[:n_common]), seed=int(seed), body=(len(pre), end),
                     params=(("n_common", n_common), ("common_freq", common_freq), ("uncommon_freq", uncommon_freq),
                             ("n_words", n_words)))


def _made_up_words(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct pronounceable nonsense words of 2-3 seeded syllables."""
    words: dict[str, None] = {}
    while len(words) < n:
        w = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=int(rng.integers(2, 4))))
        words.setdefault(w, None)
    return list(words)


def _zipf_counts(top: int, alpha: float) -> list[int]:
    """floor(top / r**alpha) for ranks r = 1, 2, ... while positive."""
    out, r = [], 1
    while (c := int(top / r**alpha)) > 0:
        out.append(c)
        r += 1
    return out


def frequent_words(codec, context_len: int, seed: int, *, alpha: float = 2.0, n_top: int = 3) -> RulerCase:
    """Made-up words with Zipf-like counts (the largest top count C that fits, count of rank r =
    floor(C / r**alpha)), shuffled; leftover room holds more words once each, then blanks. The
    answer: the `n_top` most frequent words (their counts strictly above the next one's)."""
    if alpha <= 0 or n_top < 1:
        raise ValueError(f"alpha must be > 0 and n_top >= 1, got {alpha} and {n_top}")
    rng = _rng("frequent_words", seed, context_len)
    pre = codec.encode("Read the coded text below and keep count of how often each coded word appears.")
    question = codec.encode(f" Question: what are the {n_top} most frequent coded words in the text above? Answer: "
                            f"the {n_top} most frequent coded words are")
    room = context_len - len(pre)
    words = _made_up_words(rng, 128 + 2 * int(np.sqrt(max(room, 1))))
    lens = [len(codec.encode(" " + w)) for w in words]

    def size(top: int) -> int:
        return sum(c * n for c, n in zip(_zipf_counts(top, alpha), lens))

    lo, hi = 0, room  # largest top count whose text fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= room and len(_zipf_counts(mid, alpha)) <= len(words) else (lo, mid - 1)
    counts = _zipf_counts(lo, alpha)
    if len(counts) <= n_top or counts[n_top - 1] <= counts[n_top]:
        raise ValueError(f"context_len={context_len} is too short for frequent_words with n_top={n_top}, "
                         f"alpha={alpha}: the top {n_top} counts are not distinct from the next one")
    used = size(lo)
    for n in lens[len(counts):]:  # further words once each while they fit
        if used + n > room:
            break
        counts.append(1)
        used += n
    items = np.repeat(np.arange(len(counts)), counts)[rng.permutation(sum(counts))]
    ids = list(pre)
    for i in items:
        ids += codec.encode(" " + words[int(i)])
    end = len(ids)
    return RulerCase(task="frequent_words", context=tuple(_fill(codec, ids, context_len)), question=tuple(question),
                     answers=tuple(words[:n_top]), seed=int(seed), body=(len(pre), end),
                     params=(("alpha", alpha), ("n_top", n_top), ("top_counts", counts[: n_top + 1])))


# ---------------------------------------------------------------------------------------------- suite

GENERATORS: dict[str, Callable[..., RulerCase]] = {
    "niah_single": niah_single, "niah_multikey": niah_multikey, "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery, "variable_tracking": variable_tracking, "common_words": common_words,
    "frequent_words": frequent_words}


def check_tasks(tasks: Sequence[str], arg: str = "tasks") -> None:
    """Raises a one-line ValueError naming `arg` for a task that is not one of TASKS."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown RULER task {t!r} in {arg}; allowed: {', '.join(TASKS)}")


def check_context(model, context_len: int) -> None:
    """Raises when `context_len` exceeds the model's max_position_embeddings."""
    limit = int(model.config.max_position_embeddings)
    if context_len > limit:
        raise ValueError(f"context {context_len} is longer than the model's max_position_embeddings ({limit})")


def build_case(codec, task: str, context_len: int, seed: int, **params) -> RulerCase:
    """One case of `task` (see TASKS) with its generator's parameters."""
    check_tasks([task], "task")
    return GENERATORS[task](codec, context_len, seed, **params)


def task_variants(task: str, value_types: Sequence[str] = VALUE_TYPES) -> list[dict]:
    """The parameter sets a grid runs `task` with: niah_single once per value type, others once."""
    return [dict(value_type=v) for v in value_types] if task == "niah_single" else [{}]


def build_cases(codec, *, tasks: Sequence[str] = TASKS, contexts: Sequence[int], seeds: Sequence[int],
                value_types: Sequence[str] = VALUE_TYPES) -> list[RulerCase]:
    """Every (context, task, seed) with default parameters; niah_single once per value type."""
    check_tasks(tasks)
    for v in value_types:
        if v not in VALUE_TYPES:
            raise ValueError(f"unknown value type {v!r} in value_types; allowed: {', '.join(VALUE_TYPES)}")
    out = []
    for n in contexts:
        for t in tasks:
            out += [build_case(codec, t, n, s, **kw) for kw in task_variants(t, value_types) for s in seeds]
    return out


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER's string-match-all: the fraction of `answers` found in `output` (case-insensitive)."""
    if not answers:
        return 1.0
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def score(case: RulerCase, text: str) -> dict:
    s = string_match_all(text, case.answers)
    return dict(score=s, correct=bool(s == 1.0))


ANSWER_MARGIN = 8  # tokens on top of the answers' own length: a lead-in such as " The values are"


def answer_tokens(codec, cases: Sequence[RulerCase], floor: int = 32) -> int:
    """New tokens to generate so that a model that writes every answer can be scored right: at
    least `floor`, and at least the answers' own tokens (joined as a list) plus `ANSWER_MARGIN`.
    A UUID alone is about 30 SmolLM2 tokens and four 7-digit values about 36, so a fixed 32 would
    cut correct answers short (RULER itself sizes generation per task)."""
    if floor < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {floor}")
    need = [len(codec.encode(" " + ", ".join(c.answers))) + ANSWER_MARGIN for c in cases]
    return max([floor] + need)


def run_ruler(model, methods, cases: Sequence[RulerCase], *, modes: Sequence[str] = passkey.MODES,
              max_new_tokens: int = 32, batch_size: int = 1, codec=None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Generates an answer for every (method, mode, case); one record per case with the output,
    `score` (string-match-all) and `correct`, plus the cache/speed stats (see `passkey.run_cases`).
    `max_new_tokens` is a floor, raised to `answer_tokens` so no answer is cut short."""
    for c in {c.context_len for c in cases}:
        check_context(model, c)
    codec = codec or passkey.codec_for(model)
    n_new = answer_tokens(codec, cases, max_new_tokens)
    return passkey.run_cases(model, methods, cases, score=score, modes=modes, max_new_tokens=n_new,
                             batch_size=batch_size, codec=codec, progress=progress)


def summarize(records: Sequence[dict], keys: Sequence[str] = ("method", "mode", "task", "context")) -> list[dict]:
    """Accuracy (mean string-match-all) and `all_correct` (fraction of cases with every answer)
    plus mean bytes/speed per group of `keys`."""
    rows = passkey.summarize(list(records), keys, metric="score")
    exact = passkey.summarize(list(records), keys, metric="correct")
    for r, e in zip(rows, exact):
        r["all_correct"] = e["accuracy"]
    return rows


__all__ = ["ANSWER_MARGIN", "GENERATORS", "RulerCase", "TASKS", "VALUE_TYPES", "answer_tokens", "build_case",
           "build_cases", "check_context", "check_tasks", "common_words", "frequent_words", "niah_multikey",
           "niah_multiquery", "niah_multivalue", "niah_single", "run_ruler", "score", "string_match_all",
           "summarize", "task_variants", "variable_tracking", "word_pool"]
