"""The package's layering (ARCHITECTURE.md section 2) is a checked contract: `lint-imports` reads the
layers from pyproject.toml and fails on any import from a lower layer into a higher one, including
imports inside functions."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT = pathlib.Path(sys.executable).with_name("lint-imports")


def lint(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("where, line", [
    ("cache/policies/h2o.py", "from pikv_jax.api import PiKVModel  # upward, at top level\n"),
    ("kernels/common.py", "def _lazy():\n    from pikv_jax.cache.state import LayerCache  # upward, inside a function\n"
                          "    return LayerCache\n"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, where, line):
    shutil.copytree(ROOT / "pikv_jax", tmp_path / "pikv_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pikv_jax" / where
    target.write_text(target.read_text() + "\n\n" + line)
    out = lint(tmp_path)
    assert out.returncode != 0
    module = "pikv_jax." + where[:-3].replace("/", ".")
    assert module in out.stdout and "BROKEN" in out.stdout
