"""8 simulated devices (a subprocess, so XLA_FLAGS is set before jax starts): data-parallel training over
the `data` mesh axis gives the single-device update, and a checkpoint saved with parameters sharded
over one mesh restores into a different mesh / sharding (and onto one device) with equal values."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from distill_helpers import cli_env


def test_data_parallel_training_and_restore_into_a_different_sharding():
    script = pathlib.Path(__file__).with_name("distill_mesh_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["dp_max_abs_diff"] < 1e-5
    assert res["resharded_leaves"] > 0 and res["step"] == 3
