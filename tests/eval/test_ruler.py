"""RULER-style tasks: determinism, exact lengths, answers checkable from the context with parsers
independent of the generators, string-match-all scoring, bad-input errors, and one run through
`run_eval` on a tiny random model."""

import collections
import json
import re

import pytest

from pikv_jax.eval import passkey as P
from pikv_jax.eval import ruler as R


@pytest.fixture(scope="module")
def codec():
    return P.CharCodec(97)


N = 1500  # characters: every task fits with its default parameters


@pytest.mark.parametrize("task", R.TASKS)
def test_deterministic_per_seed_and_exact_length(codec, task):
    a, b, c = (R.build_case(codec, task, N, s) for s in (0, 0, 1))
    assert a == b
    assert a.context != c.context and a.answers != c.answers
    for case in (a, c):
        assert case.context_len == N and len(case.context) == N and case.task == task
        assert case.prompt == list(case.context) + list(case.question)
        assert all(3 <= i < 97 for i in case.prompt)
    assert R.build_case(codec, task, N + 37, 0).context_len == N + 37


def _body(codec, case):
    return codec.decode(case.context[case.body[0]: case.body[1]])


@pytest.mark.parametrize("value_type", R.VALUE_TYPES)
def test_niah_single_value_types(codec, value_type):
    for seed in range(3):
        case = R.niah_single(codec, N, seed, value_type=value_type)
        (value,) = case.answers
        (key,) = dict(case.params)["keys"]
        text = codec.decode(case.context)
        if value_type == "number":
            assert re.fullmatch(r"\d{7}", value)
        elif value_type == "uuid":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
        else:
            assert re.fullmatch(r"[a-z]{4,9}", value) and value != key
        assert text.count(f"for {key} is {value}.") == 1
        assert key in codec.decode(case.question)


def _needles(text):
    """{key: [values]} of every needle sentence in a decoded context."""
    out = collections.defaultdict(list)
    for kind, key, value in re.findall(r"The hidden (number|word|code) for (\w+) is ([\w-]+)\.", text):
        out[key].append(value)
    return out


def test_niah_multi_tasks_answers_in_context(codec):
    for seed in range(3):
        mk = R.niah_multikey(codec, N, seed, n_keys=4)
        found = _needles(codec.decode(mk.context))
        keys = dict(mk.params)["keys"]
        assert sorted(found) == sorted(keys) and all(len(v) == 1 for v in found.values())
        assert list(mk.answers) == found[keys[0]]
        q = codec.decode(mk.question)
        assert keys[0] in q and all(k not in q for k in keys[1:])

        mv = R.niah_multivalue(codec, N, seed, n_values=3)
        found = _needles(codec.decode(mv.context))
        (key,) = dict(mv.params)["keys"]
        assert list(found) == [key] and sorted(found[key]) == sorted(mv.answers) and len(set(mv.answers)) == 3

        mq = R.niah_multiquery(codec, N, seed, n_queries=3)
        found = _needles(codec.decode(mq.context))
        keys = dict(mq.params)["keys"]
        assert len(mq.answers) == 3 and list(mq.answers) == [found[k][0] for k in keys]
        assert all(k in codec.decode(mq.question) for k in keys)


def _resolve(text, value):
    """Variables that end up holding `value` after the assignments in reading order."""
    env = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return sorted(k for k, v in env.items() if v == value)


@pytest.mark.parametrize("chains,hops", [(1, 4), (2, 3), (3, 2)])
def test_variable_tracking_chain_resolves(codec, chains, hops):
    for seed in range(3):
        case = R.variable_tracking(codec, N, seed, n_chains=chains, n_hops=hops)
        text = codec.decode(case.context)
        value = dict(case.params)["value"]
        assert value in codec.decode(case.question)
        assert len(case.answers) == hops + 1 and sorted(case.answers) == _resolve(text, value)
        assert len(re.findall(r"VAR [A-Z]{5} = ", text)) == chains * (hops + 1)


def _top_k_clean(counts, answers):
    """The answers are exactly the top len(answers) words and strictly beat every other word."""
    k = len(answers)
    ranked = counts.most_common()
    assert {w for w, _ in ranked[:k]} == set(answers)
    assert ranked[k - 1][1] > ranked[k][1]  # no tie at the cut


def test_common_words_top_k(codec):
    for seed in range(3):
        case = R.common_words(codec, N, seed)
        body = _body(codec, case)
        words = re.findall(r"(\d+)\. ([a-z]+)", body)
        assert [int(i) for i, _ in words] == list(range(1, len(words) + 1))  # numbered 1..n
        counts = collections.Counter(w for _, w in words)
        _top_k_clean(counts, case.answers)
        p = dict(case.params)
        assert all(counts[w] == p["common_freq"] for w in case.answers)
        assert set(counts.values()) == {p["common_freq"], p["uncommon_freq"]}
        assert codec.decode(case.context[case.body[1]:]).strip() == ""  # only blanks after the list


def test_frequent_words_top_3(codec):
    for seed in range(3):
        for n in (800, N, 3000):
            case = R.frequent_words(codec, n, seed)
            counts = collections.Counter(_body(codec, case).split())
            assert len(case.answers) == 3
            _top_k_clean(counts, case.answers)
            top = [c for _, c in counts.most_common(4)]
            assert top == dict(case.params)["top_counts"]
            assert top[0] > top[1] > top[2]  # Zipf-like: strictly decreasing head


def test_string_match_all():
    assert R.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert R.string_match_all("only 123", ["123", "456", "789"]) == pytest.approx(1 / 3)
    assert R.string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert R.string_match_all("nothing", ["123"]) == 0.0
    case = R.RulerCase(task="t", context=(3,), question=(4,), answers=("ab", "cd"), seed=0, body=(0, 1))
    assert R.score(case, "AB then x") == dict(score=0.5, correct=False)
    assert R.score(case, "cd, ab") == dict(score=1.0, correct=True)


def test_generation_length_fits_every_answer(codec):
    """A correct answer is never cut short: the generated length covers the longest answer list
    (UUIDs, four values) with room for a lead-in, and never drops below the requested floor."""
    cases = [R.niah_single(codec, N, 0, value_type="uuid"), R.niah_multivalue(codec, N, 0, n_values=4),
             R.niah_single(codec, N, 0, value_type="word")]
    n = R.answer_tokens(codec, cases, floor=3)
    lead = " is:"  # a lead-in of up to ANSWER_MARGIN - 1 tokens (the space before the list is counted)
    assert len(codec.encode(lead)) < R.ANSWER_MARGIN
    for c in cases:
        written = codec.encode(lead + " " + ", ".join(c.answers) + ".")
        assert R.string_match_all(codec.decode(written[:n]), c.answers) == 1.0
    assert n == max(len(codec.encode(" " + ", ".join(c.answers))) for c in cases) + R.ANSWER_MARGIN
    assert R.answer_tokens(codec, cases[2:], floor=500) == 500
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        R.answer_tokens(codec, cases, floor=0)


def test_summarize_uses_string_match_all():
    base = dict(method="full", mode="query_aware", task="niah_multivalue", context=100, kept_tokens=1.0,
                kept_bytes=1.0, cache_bytes=1.0, full_cache_bytes=1.0, decode_ms_per_token=1.0)
    recs = [dict(base, score=s, correct=s == 1.0) for s in (1.0, 0.5, 0.0, 0.5)]
    (row,) = R.summarize(recs)
    assert row["accuracy"] == 0.5 and row["all_correct"] == 0.25 and row["n"] == 4


def test_bad_inputs(codec):
    with pytest.raises(ValueError, match=r"unknown RULER task 'nope' in task; allowed: niah_single"):
        R.build_case(codec, "nope", N, 0)
    with pytest.raises(ValueError, match="value_type='hex'; allowed: word, number, uuid"):
        R.niah_single(codec, N, 0, value_type="hex")
    for task in R.TASKS:
        with pytest.raises(ValueError, match="context_len=60 is too short"):
            R.build_case(codec, task, 60, 0)
    with pytest.raises(ValueError, match="n_keys"):
        R.niah_multikey(codec, N, 0, n_keys=1)
    with pytest.raises(ValueError, match="common_freq must be > uncommon_freq"):
        R.common_words(codec, N, 0, common_freq=3)
    with pytest.raises(ValueError, match="too long for common_words"):
        R.common_words(codec, 100_000, 0)


def test_eval_config_errors(tmp_path):
    import argparse

    from pikv_jax.eval.cli import add_eval_args, config_from_args

    p = argparse.ArgumentParser()
    add_eval_args(p)
    with pytest.raises(ValueError, match=r"unknown task 'rular' in --tasks; allowed: passkey, ruler"):
        config_from_args(p.parse_args(["--tasks", "rular"]))
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah' in --ruler-tasks; allowed: niah_single, "):
        config_from_args(p.parse_args(["--tasks", "ruler", "--ruler-tasks", "niah_single,niah"]))
    cfg = config_from_args(p.parse_args(["--tasks", "ruler", "--ruler-tasks", "common_words,niah_single",
                                         "--ruler-value-types", "uuid", "--out", str(tmp_path)]))
    assert cfg.ruler_tasks == ["common_words", "niah_single"] and cfg.ruler_value_types == ["uuid"]
    assert tuple(config_from_args(p.parse_args([])).ruler_tasks) == R.TASKS


@pytest.fixture(scope="module")
def tiny_model():
    from pikv_jax.api import PiKVModel
    from pikv_jax.config import tiny_config

    return PiKVModel.from_config(tiny_config(max_position_embeddings=1024))


def test_context_beyond_the_model_limit(tiny_model, tmp_path):
    from pikv_jax.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(model="tiny", methods=("full",), tasks=("ruler",), contexts=(2048,), seeds=(0,),
                     out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"context 2048 is longer than the model's max_position_embeddings \(1024\)"):
        run_eval(cfg, model=tiny_model)


def test_run_eval_ruler_on_tiny_model(tiny_model, tmp_path):
    """Two methods x two tasks end to end (query-agnostic: one prefill shape for both tasks, to keep
    compiles few): records, summaries, markdown and PNG."""
    from pikv_jax.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(model="tiny", methods=("full", "streaming_llm@0.5"), tasks=("ruler",), contexts=(256,),
                     seeds=(0,), ruler_tasks=("niah_single", "variable_tracking"), ruler_value_types=("number",),
                     ruler_max_new_tokens=3, batch_size=1, modes=("query_agnostic",), out=str(tmp_path), name="r",
                     progress=False)
    payload = run_eval(cfg, model=tiny_model)
    assert payload["errors"] == []
    data = json.loads((tmp_path / "r.json").read_text())
    recs = data["ruler"]["records"]
    assert len(recs) == 2 * 2  # methods x tasks (one seed, one value type, one mode)
    assert {(r["method"], r["mode"], r["task"]) for r in recs} == {
        (m, "query_agnostic", t) for m in cfg.methods for t in cfg.ruler_tasks}
    for r in recs:
        assert r["context"] == 256 and isinstance(r["output"], str) and r["answers"]
        assert 0.0 <= r["score"] <= 1.0 and r["correct"] == (r["score"] == 1.0)
        assert r["kept_bytes"] > 0 and r["cache_bytes"] > 0
    full = [r for r in recs if r["method"] == "full"]
    sl = [r for r in recs if r["method"] == "streaming_llm@0.5"]
    assert max(r["kept_bytes"] for r in sl) < min(r["kept_bytes"] for r in full)
    summary = data["ruler"]["summary"]
    assert len(summary) == 2 * 2 and all({"accuracy", "all_correct", "task"} <= set(r) for r in summary)
    assert len(data["ruler"]["by_context"]) == 2
    md = (tmp_path / "r.md").read_text()
    assert "RULER-style tasks" in md and "| method | mode | context | niah_single | variable_tracking | mean |" in md
    assert (tmp_path / "r.png").stat().st_size > 0 and "png" in payload["meta"]["files"]
