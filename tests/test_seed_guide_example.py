"""`python examples/seed_guide.py` runs every snippet of PiKV's usage guide on pikv-jax (the last one
loads the bundled SmolLM2), printing numeric statistics."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNIPPETS = ("snippet_pikv_moe", "snippet_moe_strategies", "snippet_compression", "snippet_scheduling",
            "snippet_integration")


@pytest.mark.slow
def test_seed_guide_runs_every_snippet():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_guide.py")], capture_output=True, text=True,
                         timeout=1200, cwd=ROOT)  # a hang guard: 170 s idle, 600 s beside a long eval
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    starts = [text.index(f"{name}:") for name in SNIPPETS]
    assert starts == sorted(starts), "snippets ran out of the guide's order"
    assert "all snippets ran" in text
    # every statistic the guide prints is a number (hit rates in [0, 1], ratios > 0)
    hit_rates = [float(x) for x in re.findall(r"hit rate[^:]*: ([0-9.]+)", text)]
    assert len(hit_rates) >= 15 and all(0.0 <= h <= 1.0 for h in hit_rates)
    ratios = [float(x) for x in re.findall(r"compression ratio[^0-9\n]*([0-9]+\.[0-9]+)", text)]
    assert len(ratios) >= 6 and all(r > 0 for r in ratios)
    assert "nan" not in text.lower()
