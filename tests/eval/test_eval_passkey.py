"""Passkey cases: exact context length, needle at the requested depth, scoring, and a run through
a tiny random model (token-id prompts via the character codec)."""

import pytest

from pikv_jax.eval import passkey as P


@pytest.fixture(scope="module")
def tiny_model():
    from pikv_jax.api import PiKVModel
    from pikv_jax.config import tiny_config

    return PiKVModel.from_config(tiny_config(max_position_embeddings=2048))


@pytest.fixture(scope="module")
def codec():
    return P.CharCodec(97)


@pytest.fixture(scope="module")
def stacks(codec):
    return {h: P.make_haystack(codec, h) for h in P.HAYSTACKS}


def test_char_codec_round_trip(codec):
    ids = codec.encode("The pass key is 48213.\nok~")
    assert all(3 <= i < 97 for i in ids)
    assert codec.decode(ids) == "The pass key is 48213. ok?"  # "~" is past the 94 codes: unknown
    with pytest.raises(ValueError, match="vocab_size"):
        P.CharCodec(20)


def test_shipped_haystacks(codec):
    rep, var = P.haystack_text("repetitive"), P.haystack_text("varied")
    assert rep.startswith("The grass is green. The sky is blue.")
    words = var.split()
    assert len(words) > 6000 and len(set(words)) > 2000  # varied, several thousand words
    hay, held = P.split_heldout(var)
    assert held and hay and held not in hay and len(held.split()) > 0.25 * len(words)
    with pytest.raises(ValueError, match="unknown haystack"):
        P.haystack_text("nope")


@pytest.mark.parametrize("n", [500, 777, 1024])
@pytest.mark.parametrize("keys", [1, 3])
def test_context_is_exactly_n_tokens(codec, stacks, n, keys):
    for h, stack in stacks.items():
        for depth in (0.0, 0.37, 1.0):
            case = P.build_case(codec, stack, n, depth, seed=3, n_keys=keys)
            assert case.context_len == n and len(case.context) == n
            text = codec.decode(case.context)
            for k in case.keys:
                assert text.count(k) == 2  # "... is K. Remember it. K is ..."
            assert len(case.answer) == 5 and case.answer.isdigit() and case.answer == case.keys[0]
            assert case.prompt == list(case.context) + list(case.question)
            assert codec.decode(case.question).endswith("is")


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_exact_depth_without_snapping(codec, stacks, depth):
    case = P.build_case(codec, stacks["varied"], 400, depth, seed=0, snap=False)
    pre = len(codec.encode(P.INSTRUCTION))
    body = 400 - pre - case.needle_len
    assert case.needle_start == pre + int(round(depth * body))
    assert case.actual_depth == pytest.approx(round(depth * body) / body)
    needle = codec.encode(P.needle_text(case.answer, None))
    assert list(case.context[case.needle_start: case.needle_start + len(needle)]) == needle


def test_snapped_needle_follows_a_sentence_end(codec, stacks):
    for depth in (0.2, 0.5, 0.8):
        case = P.build_case(codec, stacks["varied"], 3000, depth, seed=1)  # characters: ~25 sentences
        before = codec.decode(case.context[: case.needle_start])
        assert before.rstrip().endswith((".", "!", "?"))
        assert abs(case.actual_depth - depth) < 0.06


def test_insertion_point():
    starts = [True, False, False, True, False, False, False, True]
    assert P.insertion_point(2, starts) == 3
    assert P.insertion_point(5, starts) == 3  # tie 3 vs 7? |5-3|=2 < |5-7|=2 -> earlier wins
    assert P.insertion_point(6, starts) == 7
    assert P.insertion_point(8, starts) == 8
    assert P.insertion_point(5, starts, snap=False) == 5
    assert P.insertion_point(-4, starts, snap=False) == 0 and P.insertion_point(99, starts, snap=False) == 8


def test_seeds_vary_keys_and_text(codec, stacks):
    a = P.build_case(codec, stacks["varied"], 400, 0.5, seed=0)
    b = P.build_case(codec, stacks["varied"], 400, 0.5, seed=1)
    assert a.answer != b.answer and a.context != b.context
    assert P.build_case(codec, stacks["varied"], 400, 0.5, seed=0) == a  # deterministic


def test_multi_key_cases(codec, stacks):
    case = P.build_case(codec, stacks["repetitive"], 700, 0.4, seed=2, n_keys=3)
    assert len(set(case.keys)) == 3 and len(set(case.labels)) == 3
    q = codec.decode(case.question)
    assert case.labels[0] in q and all(lab not in q for lab in case.labels[1:])
    text = codec.decode(case.context)
    assert f"pass key for the {case.labels[0]} is {case.answer}" in text


def test_bad_arguments(codec, stacks):
    with pytest.raises(ValueError, match="depth"):
        P.build_case(codec, stacks["varied"], 400, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        P.build_case(codec, stacks["varied"], 100, 0.5, seed=0)
    with pytest.raises(ValueError, match="n_keys"):
        P.build_case(codec, stacks["varied"], 400, 0.5, seed=0, n_keys=0)


def test_score_answer():
    assert P.score_answer(" 48213. Remember it.", "48213")
    assert P.score_answer("48213", "48213")
    assert not P.score_answer(" 4821 3", "48213")
    assert not P.score_answer(" the pass key", "48213")


def test_summarize():
    recs = [dict(method="full", mode="query_aware", context=100, correct=c, kept_tokens=10.0, kept_bytes=100.0,
                 cache_bytes=200.0, full_cache_bytes=100.0, decode_ms_per_token=1.0) for c in (True, False, True, True)]
    (row,) = P.summarize(recs)
    assert row["accuracy"] == 0.75 and row["n"] == 4 and row["kept_fraction"] == 1.0


def test_batches_one_shape_per_context():
    class C:
        def __init__(self, n, q):
            self.context_len, self.question = n, [0] * q
    cases = [C(100, 5)] * 5 + [C(100, 7)] * 2 + [C(200, 5)]
    out = list(P._batches(cases, 2))
    # questions of different lengths share a batch (generate pads them per row); contexts never do
    assert [{cases[i].context_len for i in c + p} for c, p in out] == [{100}] * 4 + [{200}]
    assert [len(c) + len(p) for c, p in out] == [2, 2, 2, 2, 1]
    assert sorted(i for c, _ in out for i in c) == list(range(8))
    assert P.count_calls(cases, 2) == 5


def test_run_passkey_on_tiny_model(tiny_model):
    from pikv_jax.eval.methods import parse_methods

    codec = P.codec_for(tiny_model)
    assert isinstance(codec, P.CharCodec)
    cases = P.build_cases(codec, contexts=[320], depths=[0.0, 1.0], seeds=[0], haystacks=["repetitive"])
    methods = parse_methods("full,streaming_llm@0.5", num_layers=2)
    recs = P.run_passkey(tiny_model, methods, cases, max_new_tokens=3, batch_size=2)
    assert len(recs) == 2 * 2 * 2
    by = {(r["method"], r["mode"]): r for r in recs}
    full, snap = by["full", "query_aware"], by["streaming_llm@0.5", "query_agnostic"]
    assert full["kept_bytes"] > snap["kept_bytes"] > 0
    assert snap["kept_bytes"] < 0.7 * full["kept_bytes"]
    assert all(isinstance(r["correct"], bool) and isinstance(r["output"], str) for r in recs)
    per_token = 2 * 2 * 16 * 2 * 2  # layers x kv heads x head dim x (K, V) x bf16
    assert full["kept_bytes"] == pytest.approx(full["kept_tokens"] * per_token)
    assert full["kept_tokens"] >= 320
    s = P.summarize(recs)
    assert {(r["method"], r["mode"]) for r in s} == set(by)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in s)
    with pytest.raises(ValueError, match="mode"):
        P.run_passkey(tiny_model, methods, cases, modes=["sideways"])
