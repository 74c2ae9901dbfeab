"""Report writing (JSON, PNG, markdown) and a whole `run_eval` on a tiny random model."""

import json
import math

import pytest

from pikv_jax.eval import report as R
from pikv_jax.eval.passkey import summarize as passkey_summary
from pikv_jax.eval.ruler import summarize as ruler_summary


def _summary():
    rows = []
    for method, acc, kept in [("full", 1.0, 8.0), ("h2o@0.5", 0.75, 4.0), ("h2o@0.25", 0.5, 2.0),
                              ("snapkv@0.5", 1.0, 4.0), ("snapkv@0.25", 0.75, 2.0)]:
        for mode in ("query_aware", "query_agnostic"):
            rows.append(dict(method=method, mode=mode, context=2048, n=4,
                             accuracy=acc if mode == "query_aware" else acc / 2,
                             kept_tokens=kept * 10, kept_bytes=kept * R.MiB,
                             cache_bytes=(2 if mode == "query_aware" else 1.5) * kept * R.MiB,
                             full_cache_bytes=8 * R.MiB, decode_ms_per_token=10 * kept, kept_fraction=kept / 8))
    return rows


def test_labels():
    assert R.split_label("h2o@0.25") == ("h2o", "0.25") and R.split_label("full") == ("full", "")
    assert R.split_label("snapkv+h2o@0.5") == ("snapkv+h2o", "0.5")
    assert R.budget_text("0.25") == "25%" and R.budget_text("256t") == "256 tok" and R.budget_text("") == "100%"


def test_markdown_table():
    ppl = [dict(method="full", ppl_change=0.0, kl_mean=0.0, top1_agreement=1.0),
           dict(method="h2o@0.25", ppl_change=0.123, kl_mean=0.0456, top1_agreement=0.9)]
    md = R.markdown_table(_summary(), prefix_ppl=ppl, context=2048)
    lines = md.splitlines()
    assert lines[0].startswith("| method | budget | passkey q-aware")
    assert len(lines) == 2 + 5
    assert lines[2].startswith("| full | 100% | 100% | 50% | +0.0% | 0.000 | 100% | 8.0 | 12.0 | 80.0 | 1.00x |")
    h2o = next(line for line in lines if line.startswith("| h2o | 25%"))
    assert "+12.3%" in h2o and "0.046" in h2o and "0.25x" in h2o
    # budgets: 50% rows before 25% rows
    assert lines.index(next(line for line in lines if "| 50% |" in line)) < lines.index(h2o)
    assert "n/a" in R.markdown_table(_summary(), context=2048)  # no perplexity rows


def test_markdown_table_takes_decode_ms_from_speed_rows_at_the_table_context():
    speed = [dict(method="full", context=2048, batch=1, decode_ms_per_token=40.0),
             dict(method="h2o@0.25", context=2048, batch=1, decode_ms_per_token=10.0),
             dict(method="h2o@0.25", context=2048, batch=4, decode_ms_per_token=99.0),  # larger batch: ignored
             dict(method="h2o@0.25", context=4096, batch=1, decode_ms_per_token=77.0)]  # other context: ignored
    lines = R.markdown_table(_summary(), context=2048, speed=speed).splitlines()
    assert lines[2].startswith("| full |") and lines[2].endswith("| 40.0 | 1.00x |")
    h2o = next(line for line in lines if line.startswith("| h2o | 25%"))
    assert h2o.endswith("| 10.0 | 0.25x |")


def test_markdown_table_allocated_bytes_come_from_the_timed_run_per_sequence():
    speed = [dict(method="full", context=2048, batch=1, decode_ms_per_token=40.0, cache_bytes=9 * R.MiB),
             dict(method="h2o@0.25", context=2048, batch=1, decode_ms_per_token=10.0, cache_bytes=3 * R.MiB)]
    lines = R.markdown_table(_summary(), context=2048, speed=speed).splitlines()
    assert lines[2].endswith("| 8.0 | 9.0 | 40.0 | 1.00x |")  # kept from passkey, allocated from the timed run
    h2o = next(line for line in lines if line.startswith("| h2o | 25%"))
    assert h2o.endswith("| 2.0 | 3.0 | 10.0 | 0.25x |")
    snap = next(line for line in lines if line.startswith("| snapkv | 25%"))  # not timed: the q-agnostic run's
    assert "| 2.0 | 3.0 |" in snap
    # a method with perplexity rows only is not a row of a table at one context
    ppl_only = R.markdown_table(_summary(), context=2048, prefix_ppl=[dict(method="int4", ppl_change=0.01)])
    assert "| int4 |" not in ppl_only and "| int4 |" in R.markdown_table(
        _summary(), prefix_ppl=[dict(method="int4", ppl_change=0.01)])
    two = [dict(r, batch=2, cache_bytes=2 * r["cache_bytes"]) for r in speed]  # per sequence
    full_line = R.markdown_table(_summary(), context=2048, speed=two).splitlines()[2]
    assert full_line.endswith("| 8.0 | 9.0 | 40.0 | 1.00x |")


def test_json_is_strict_and_png_written(tmp_path):
    p = R.write_json(str(tmp_path / "sub" / "x.json"), {"a": float("nan"), "b": [1.0, float("inf")], "c": True})
    data = json.loads(open(p).read())
    assert data == {"a": None, "b": [1.0, None], "c": True}
    png = R.plot_accuracy_vs_bytes(_summary(), str(tmp_path / "acc.png"), context=2048)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert R.plot_accuracy_vs_bytes(_summary(), str(tmp_path / "none.png"), context=1) is None


def test_other_tables():
    sp = R.speed_table([dict(context=4096, batch=1, method="full", decode_ms_per_token=50.0, ratio_vs_full=1.0,
                             cache_bytes=R.MiB),
                        dict(context=4096, batch=1, method="h2o@0.25", decode_ms_per_token=30.0,
                             decode_ms_per_token_min=28.0, decode_ms_per_token_max=33.5, ratio_vs_full=0.6,
                             ratio_vs_full_min=0.55, ratio_vs_full_max=0.65, cache_bytes=R.MiB / 4)])
    assert "| 4096 | 1 | full | 50.0 | n/a | 1.00x | n/a | 1.0 |" in sp  # a row of an older run: no ranges
    assert "| 4096 | 1 | h2o@0.25 | 30.0 | 28.0-33.5 | 0.60x | 0.55-0.65x | 0.2 |" in sp
    ev = R.eviction_table([dict(method="streaming_llm@512t", cache_tokens=512, text_tokens=2048, ppl=10.0,
                                ppl_change=0.05)])
    assert "| streaming_llm@512t | 512 | 2048 | 10.00 | +5.0% |" in ev


def test_run_eval_on_tiny_model(tmp_path):
    """Every task end to end on a tiny random model (character codec), outputs written and sane."""
    from pikv_jax.api import PiKVModel
    from pikv_jax.config import tiny_config
    from pikv_jax.eval.runner import EvalConfig, run_eval

    model = PiKVModel.from_config(tiny_config(max_position_embeddings=2048))
    cfg = EvalConfig(model="tiny", methods=("full", "snapkv(obs_window=8)@0.25"),
                     tasks=("passkey", "ppl", "fidelity", "speed"),
                     contexts=(320,), depths=(0.5,), seeds=(0,), haystacks=("varied",), keys=(1,), max_new_tokens=2,
                     batch_size=1, ppl_prefix=64, ppl_tokens=8, ppl_windows=2, eviction_cache=32, eviction_factor=4,
                     speed_context=256, speed_methods=("full", "snapkv(obs_window=8)@0.25"), speed_new_tokens=3,
                     out=str(tmp_path), name="tiny", progress=False, resume=True)
    payload = run_eval(cfg, model=model)
    files = payload["meta"]["files"]
    for k in ("json", "md", "png"):
        assert (tmp_path / f"tiny.{k}").exists() and files[k].endswith(k)
    assert not (tmp_path / "tiny.partial.jsonl").exists() and payload["errors"] == []
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert len(data["passkey"]["records"]) == 2 * 2
    ppl = {r["method"]: r for r in data["prefix_perplexity"]}
    assert ppl["full"]["kl_mean"] == 0.0 and ppl["full"]["top1_agreement"] == 1.0 and ppl["full"]["ppl_change"] == 0.0
    assert ppl["snapkv(obs_window=8)@0.25"]["kl_mean"] > 0 and math.isfinite(ppl["snapkv(obs_window=8)@0.25"]["ppl"])
    ev = {r["method"]: r for r in data["eviction_perplexity"]}
    assert set(ev) == {"full", "streaming_llm@32t"} and ev["streaming_llm@32t"]["text_tokens"] == 128
    assert all(math.isfinite(r["ppl"]) for r in ev.values())
    sp = {r["method"]: r for r in data["decode_speed"]}
    assert sp["full"]["ratio_vs_full"] == 1.0 and sp["full"]["ratio_vs_full_max"] == 1.0
    for r in sp.values():  # warm-up, then 5 interleaved rounds; median and range recorded (values not asserted)
        assert len(r["decode_ms_per_token_rounds"]) == 5 and len(r["decode_ms_per_token_warmup"]) == 1
        assert r["decode_ms_per_token_min"] <= r["decode_ms_per_token"] <= r["decode_ms_per_token_max"]
        assert r["ratio_vs_full_min"] <= r["ratio_vs_full_max"] and r["protocol"]["meets_protocol"]
    g = data["goals"]["decode_4k_25pct"]
    assert g["met"] == (g["ratio_range"][1] <= 0.6)
    assert sp["snapkv(obs_window=8)@0.25"]["cache_bytes"] < sp["full"]["cache_bytes"]
    assert set(data["goals"]) == {"passkey_25pct", "decode_4k_25pct", "streaming_llm_ppl"}
    assert data["goals"]["passkey_25pct"]["best_method"] == "snapkv(obs_window=8)@0.25"
    md = (tmp_path / "tiny.md").read_text()
    assert "| method | budget |" in md and "Decode-time eviction" in md and "Goals:" in md


def test_decode_goal_needs_the_whole_ratio_range():
    from pikv_jax.eval.runner import goals

    def row(method, ratio, lo=None, hi=None):
        r = dict(method=method, context=4096, batch=1, ratio_vs_full=ratio)
        if lo is not None:
            r.update(ratio_vs_full_min=lo, ratio_vs_full_max=hi, ratio_vs_full_range_from="per-round")
        return r

    base = [row("full", 1.0, 1.0, 1.0)]
    g = goals({"decode_speed": base + [row("h2o@0.25", 0.55, 0.5, 0.62)]}, table_context=None)["decode_4k_25pct"]
    assert g["met"] is False and g["median_meets"] is True and g["ratio_range"] == [0.5, 0.62]
    # the best method is the one with the lowest upper end, and it meets the goal
    speed = base + [row("h2o@0.25", 0.55, 0.5, 0.62), row("snapkv@0.25", 0.57, 0.55, 0.59)]
    g = goals({"decode_speed": speed}, table_context=None)["decode_4k_25pct"]
    assert g["met"] is True and g["method"] == "snapkv@0.25" and [a["met"] for a in g["all"]] == [False, True]
    # a row of a run without rounds: its single value is its range
    g = goals({"decode_speed": base + [row("h2o@0.25", 0.59)]}, table_context=None)["decode_4k_25pct"]
    assert g["met"] is True and g["range_from"].startswith("one measurement")


def test_config_validation():
    from pikv_jax.eval.runner import EvalConfig, smoke_config

    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=("passkey", "nope")).validate()
    with pytest.raises(ValueError, match="depths"):
        EvalConfig(depths=(1.2,)).validate()
    with pytest.raises(ValueError, match="mode"):
        EvalConfig(modes=("x",)).validate()
    s = smoke_config()
    s.validate()
    assert s.contexts == (512,) and len(s.depths) == 2 and len(s.seeds) == 1


def test_cli_args(tmp_path):
    import argparse

    from pikv_jax.eval.cli import add_eval_args, config_from_args

    p = argparse.ArgumentParser()
    add_eval_args(p)
    a = p.parse_args(["--methods", "full,h2o(recent_ratio=0.3,normalize=True)@0.25", "--contexts", "1024,2048",
                      "--depths", "0,50%,1", "--seeds", "0,1", "--haystack", "varied", "--tasks", "passkey,ppl",
                      "--out", str(tmp_path)])
    cfg = config_from_args(a)
    assert cfg.methods == ["full", "h2o(recent_ratio=0.3,normalize=True)@0.25"]
    assert cfg.contexts == [1024, 2048] and cfg.depths == [0.0, 0.5, 1.0] and cfg.haystacks == ["varied"]
    assert cfg.tasks == ["passkey", "ppl"] and cfg.out == str(tmp_path)
    smoke = config_from_args(p.parse_args(["--smoke", "--out", str(tmp_path)]))
    assert smoke.name == "eval-smoke" and smoke.contexts == (512,)
    with pytest.raises(SystemExit):
        p.parse_args(["--contexts", "1k"])
    with pytest.raises(ValueError, match="unknown task"):
        config_from_args(p.parse_args(["--tasks", "passkey,bogus"]))


def test_checkpoint_round_trip(tmp_path):
    from pikv_jax.eval.runner import Checkpoint

    path = str(tmp_path / "x.partial.jsonl")
    ck = Checkpoint(path)
    assert ck.get(["passkey", 2048, "h2o@0.25"]) is None
    ck.put(["passkey", 2048, "h2o@0.25"], [{"a": 1.0, "b": float("nan")}])
    with open(path, "a") as f:
        f.write('{"key": "cut in the mid')  # an interrupted write
    again = Checkpoint(path)
    assert again.get(["passkey", 2048, "h2o@0.25"]) == [{"a": 1.0, "b": None}]
    again.finish()
    assert not (tmp_path / "x.partial.jsonl").exists()
    off = Checkpoint(None)
    off.put(["k"], 1)
    assert off.get(["k"]) is None


def test_eval_refuses_a_bad_mesh_before_loading():
    from pikv_jax.eval.runner import EvalConfig

    with pytest.raises(ValueError, match="unknown mesh axis|rows"):
        EvalConfig(mesh="rows=2").validate()


def _ruler_rows(context=2048):
    return [dict(method=m, mode=mode, context=context, n=9, accuracy=acc if mode == "query_aware" else acc / 2,
                 kept_bytes=kb * R.MiB, cache_bytes=2 * kb * R.MiB)
            for m, acc, kb in [("full", 0.5, 8.0), ("h2o@0.25", 0.25, 2.0), ("tova@0.25", 0.4, 2.0)]
            for mode in ("query_aware", "query_agnostic")]


def test_markdown_table_ruler_columns_and_side_by_side_ratio_range():
    speed = [dict(method="full", context=2048, batch=1, decode_ms_per_token=40.0, ratio_vs_full=1.0,
                  ratio_vs_full_min=1.0, ratio_vs_full_max=1.0),
             dict(method="h2o@0.25", context=2048, batch=1, decode_ms_per_token=30.0, ratio_vs_full=0.75,
                  ratio_vs_full_min=0.7, ratio_vs_full_max=0.81)]
    lines = R.markdown_table(_summary(), context=2048, speed=speed, ruler=_ruler_rows()).splitlines()
    assert lines[0].startswith("| method | budget | passkey q-aware | passkey q-agnostic | RULER q-aware | "
                               "RULER q-agnostic | ppl change")
    assert lines[2].startswith("| full | 100% | 100% | 50% | 0.50 | 0.25 |") and lines[2].endswith("| 40.0 | 1.00x |")
    h2o = next(line for line in lines if line.startswith("| h2o | 25%"))
    assert "| 50% | 25% | 0.25 | 0.12 |" in h2o and h2o.endswith("| 30.0 | 0.75x (0.70-0.81) |")
    # a method measured only on RULER still gets its row, with its bytes; passkey cells say n/a
    tova = next(line for line in lines if line.startswith("| tova | 25%"))
    assert tova.startswith("| tova | 25% | n/a | n/a | 0.40 | 0.20 |") and "| 2.0 | 4.0 |" in tova
    # RULER rows at another context are not this table's
    assert "RULER" not in R.markdown_table(_summary(), context=2048, ruler=_ruler_rows(4096))


def test_merge_runs_and_one_table_per_context():
    grid = {"passkey": {"summary": _summary()}, "prefix_perplexity": [dict(method="full", ppl_change=0.0)],
            "decode_speed": [dict(method="full", context=2048, batch=1, decode_ms_per_token=40.0)]}
    four_k = {"passkey": {"summary": [dict(r, context=4096) for r in _summary()]}}
    merged = R.merge_runs([grid, {"ruler": {"by_context": _ruler_rows()}}, four_k])
    assert len(merged["passkey"]) == 2 * len(_summary()) and len(merged["ruler"]) == 6
    md = R.policy_tables(merged, [2048, 4096])
    assert md.index("Context 2048 tokens (passkey: 4 cases per mode; RULER: 9 cases per mode):") < md.index(
        "Context 4096 tokens (passkey: 4 cases per mode):")
    t2k, t4k = md.split("Context 4096 tokens")
    assert "RULER q-aware" in t2k and "RULER q-aware" not in t4k and "| 40.0 |" in t2k
    with pytest.raises(ValueError, match="payloads 0 and 1 both hold passkey row"):
        R.merge_runs([grid, grid])


def test_merge_runs_speed_from_replaces_whole_groups_only():
    def timed(method, context, batch, ms):
        return dict(method=method, context=context, batch=batch, decode_ms_per_token=ms)

    old = {"decode_speed": [timed("full", 4096, 1, 50.0), timed("h2o@0.25", 4096, 1, 40.0),
                            timed("full", 2048, 1, 30.0), timed("full", 4096, 8, 90.0)]}
    new = {"decode_speed": [timed("full", 4096, 1, 48.0), timed("h2o@0.25", 4096, 1, 39.0),
                            timed("tova@0.5", 4096, 1, 44.0)]}
    with pytest.raises(ValueError, match="both hold decode_speed row"):
        R.merge_runs([old, new])
    got = {(r["method"], r["context"], r["batch"]): r["decode_ms_per_token"]
           for r in R.merge_runs([old, new], speed_from=1)["decode_speed"]}
    # the (4096, 1) group is the new run's whole; other contexts and batches keep the old rows
    assert got == {("full", 4096, 1): 48.0, ("h2o@0.25", 4096, 1): 39.0, ("tova@0.5", 4096, 1): 44.0,
                   ("full", 2048, 1): 30.0, ("full", 4096, 8): 90.0}
    with pytest.raises(ValueError, match=r"speed_from 2; allowed: a payload index in \[0, 2\)"):
        R.merge_runs([old, new], speed_from=2)


def _passkey_records(haystack, correct):
    return [dict(method="tova@0.25", mode=mode, context=4096, depth=d, seed=0, haystack=haystack, n_keys=1,
                 correct=ok, kept_tokens=1024.0, kept_bytes=kb, cache_bytes=2 * kb, full_cache_bytes=4 * R.MiB,
                 decode_ms_per_token=ms)
            for mode in ("query_aware", "query_agnostic")
            for d, ok, kb, ms in zip((0.1, 0.5, 0.9), correct, (R.MiB, R.MiB, 1.5 * R.MiB), (30.0, 31.0, 32.0))]


def _passkey_run(records):
    return {"passkey": {"summary": passkey_summary(records), "records": records}}


def test_merge_runs_unions_the_cases_of_runs_that_hold_different_ones():
    varied, repetitive = _passkey_records("varied", (True, False, False)), _passkey_records("repetitive", (1, 1, 0))
    got = R.merge_runs([_passkey_run(varied), _passkey_run(repetitive)])["passkey"]
    # one row per (method, mode, context), over all six cases: (1 + 2) / 6 right, bytes the mean of six
    assert [(r["mode"], r["n"]) for r in got] == [("query_aware", 6), ("query_agnostic", 6)]
    assert got[0]["accuracy"] == pytest.approx(0.5) and got[0]["kept_bytes"] == pytest.approx(3.5 / 3 * R.MiB)
    assert got[0]["kept_fraction"] == pytest.approx(3.5 / 12)
    # the same case measured twice is refused, and so is a row whose runs kept no records
    with pytest.raises(ValueError, match="payloads 0 and 1 both hold passkey row"):
        R.merge_runs([_passkey_run(varied), _passkey_run(varied[:1])])
    with pytest.raises(ValueError, match="payloads 0 and 1 both hold passkey row"):
        R.merge_runs([_passkey_run(varied), {"passkey": {"summary": _passkey_run(repetitive)["passkey"]["summary"]}}])
    # RULER rows: score is the mean string-match-all, all_correct the fraction of fully right cases
    ruler = [dict(method="full", mode="query_aware", context=4096, task=t, value_type=v, seed=s, haystack="varied",
                  score=sc, correct=sc == 1.0, kept_tokens=1.0, kept_bytes=1.0, cache_bytes=1.0,
                  full_cache_bytes=1.0, decode_ms_per_token=1.0)
             for t, v, s, sc in [("niah_single", "word", 0, 1.0), ("common_words", None, 0, 0.2),
                                 ("niah_single", "word", 1, 0.0), ("common_words", None, 1, 0.6)]]
    runs = [{"ruler": {"by_context": ruler_summary(part, ("method", "mode", "context")), "records": part}}
            for part in (ruler[:2], ruler[2:])]
    (row,) = R.merge_runs(runs)["ruler"]
    assert row["n"] == 4 and row["accuracy"] == pytest.approx(0.45) and row["all_correct"] == pytest.approx(0.25)


def test_policy_table_script_errors_are_one_line(tmp_path, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "policy_table.py"
    spec = importlib.util.spec_from_file_location("policy_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"passkey": {"summary": _summary()}}))
    out = tmp_path / "t.md"
    assert mod.main([str(run), "--out", str(out)]) == 0 and "| h2o | 25% |" in out.read_text()
    for argv, msg in [([str(run), "--contexts", "4k"], "--contexts: integers"),
                      ([str(run), "--contexts", "4096"], "no passkey or RULER rows at [4096]"),
                      ([str(run), str(run)], "runs: payloads 0 and 1"),
                      ([str(run), "--speed-from", "other.json"], "--speed-from: one of the runs given"),
                      ([str(tmp_path / "missing.json")], "runs: cannot read")]:
        capsys.readouterr()
        assert mod.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err
