"""Two real processes on 127.0.0.1 (4 CPU devices each, gloo collectives) reproduce the
single-device MoE output through DistributedPiKVMoE, launched by scripts/launch_multihost.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from moe_helpers import ROOT


@pytest.mark.slow
def test_two_processes_reproduce_single_device_output(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_multihost.py"), "-n", "2", "--devices-per-process", "4",
           "--timeout", "500", "--", sys.executable, "-m", "pikv_jax.moe.multihost_check", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=560, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert r["process_id"] == i and r["num_processes"] == 2
        assert r["num_devices"] == 8 and r["local_devices"] == 4
        assert r["mesh"] == {"data": 2, "expert": 4}
        assert r["cases"]["balanced"]["max_abs_diff"] < 1e-5
        assert r["cases"]["balanced"]["dropped"] == 0
        assert r["cases"]["skewed"]["max_abs_diff"] < 1e-5
        assert r["cases"]["skewed"]["dropped"] == r["cases"]["skewed"]["dropped_single"] > 0


def test_launcher_reports_failure_and_stops_the_rest(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import launch_multihost
    finally:
        sys.path.pop(0)
    import io

    out = io.StringIO()
    code = "import os, sys, time; pid = int(os.environ['PIKV_PROCESS_ID']); " \
           "print('rank', pid, os.environ['PIKV_NUM_PROCESSES'], os.environ['PIKV_COORDINATOR'], flush=True); " \
           "sys.exit(3) if pid == 1 else time.sleep(60)"
    status = launch_multihost.launch([sys.executable, "-c", code], 2, timeout=50, out=out)
    text = out.getvalue()
    assert status == 3
    assert "[p0] rank 0 2 127.0.0.1:" in text and "[p1] rank 1 2" in text
    assert "[killed by launcher]" in text
    with pytest.raises(ValueError, match="no command"):
        launch_multihost.launch([], 2)
