"""scripts/bench_prefill.py end to end on the tiny model: every method timed by the protocol."""

import importlib.util
import json
import pathlib

import pytest


def _script():
    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_prefill.py"
    spec = importlib.util.spec_from_file_location("bench_prefill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_every_method_with_rounds_and_ratios(tmp_path):
    out = tmp_path / "p.json"
    assert _script().main(["--quick", "--methods", "full;snapkv@0.25;adakv(kvzip(budget_scope=global))@0.25",
                           "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["full", "snapkv@0.25", "adakv(kvzip(budget_scope=global))@0.25"]
    assert data["protocol"]["meets_protocol"] and rows["full"]["ratio_vs_full"] == 1.0
    for r in rows.values():  # values not asserted: timings
        assert len(r["prefill_s_rounds"]) == 5 and len(r["prefill_s_warmup"]) == 1
        assert r["prefill_s_min"] <= r["prefill_s"] <= r["prefill_s_max"]
        assert r["ratio_vs_full_min"] <= r["ratio_vs_full"] <= r["ratio_vs_full_max"]


def test_bad_arguments_are_refused():
    mod = _script()
    with pytest.raises(SystemExit, match="first method must be 'full'"):
        mod.main(["--quick", "--methods", "snapkv@0.25;full"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--rounds", "3"])
