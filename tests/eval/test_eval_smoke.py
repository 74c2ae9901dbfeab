"""`pikv eval --smoke` on the real SmolLM2: outputs exist and the numbers are sane."""

import json
import math
import time

import pytest


@pytest.mark.slow
def test_smoke_run(tmp_path):
    import argparse

    from pikv_jax.eval.cli import add_eval_args, cmd_eval

    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--smoke", "--out", str(tmp_path), "--no-progress", "--json"])
    t0 = time.perf_counter()
    assert cmd_eval(args) == 0
    elapsed = time.perf_counter() - t0
    for ext in ("json", "png", "md"):
        assert (tmp_path / f"eval-smoke.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "eval-smoke.json").read_text())
    summary = {(r["method"], r["mode"]): r for r in data["passkey"]["summary"]}
    assert summary["full", "query_aware"]["accuracy"] > 0
    assert summary["full", "query_agnostic"]["accuracy"] > 0
    for (m, _), r in summary.items():
        assert 0 <= r["accuracy"] <= 1 and r["kept_bytes"] > 0
        if m != "full":
            assert r["kept_bytes"] < summary["full", "query_aware"]["kept_bytes"]
    ppl = {r["method"]: r for r in data["prefix_perplexity"]}
    assert ppl["full"]["kl_mean"] == 0.0 and ppl["full"]["top1_agreement"] == 1.0
    for r in ppl.values():
        assert math.isfinite(r["ppl"]) and 1.0 < r["ppl"] < 1000 and r["kl_mean"] >= 0
    ev = data["eviction_perplexity"]
    assert len(ev) == 2 and all(math.isfinite(r["ppl"]) for r in ev)
    print(f"smoke eval took {elapsed:.0f}s (timings {data['meta']['timings']})")
