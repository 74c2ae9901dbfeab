"""scripts/bench_e2e_gpu.py --mesh: bad meshes are one-line argparse errors before any work (in this
process), and a smoke run on 8 simulated CPU devices places the model and the cache, decodes, and
reports bytes per device and the decode step's collectives (one subprocess)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_e2e_gpu  # noqa: E402


@pytest.mark.parametrize("spec, message", [
    ("data=2,tensor=4", "argument --mesh: mesh axis 'tensor' is unknown; allowed: data, model, expert, seq"),
    ("data2", "argument --mesh: mesh spec entry 'data2' is not axis=size"),
    ("data=0", "argument --mesh: mesh axis 'data' has size 0; sizes must be integers >= 1"),
    ("data=2,model=4", "--mesh data=2,model=4: mesh data=2 x model=4 needs 8 devices, only 1 available"),
])
def test_bad_meshes_are_one_line_errors(spec, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_e2e_gpu.py", "--quick", "--mesh", spec, "--out", "/dev/null"])
    with pytest.raises(SystemExit) as e:
        bench_e2e_gpu.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("bench_e2e_gpu.py: error: ")


@pytest.mark.slow
def test_mesh_smoke_run_on_eight_cpu_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts")]))
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_e2e_gpu.py"), "--quick", "--mesh", "data=2,model=4",
           "--context", "64", "--steps", "2", "--repeats", "1", "--configs", "full", "--batches", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["mesh"] == {"data": 2, "model": 4} and len(d["rows"]) == 1
    r = d["rows"][0]
    assert "error" not in r and r["impl"] == "xla" and r["steps"] == 2
    # full cache [B, Hkv=2, C, D]: rows over data=2; 2 KV heads on model=4 is the replicated-head layout
    assert r["cache_read_bytes_per_device"] * 2 == r["cache_read_bytes"]
    step = r["decode_step_collectives"]
    assert step["count"] > 0 and "all-reduce" in step["by_op"]  # the row-split MLP / vocabulary joins
