#!/usr/bin/env python
"""Launches N cooperating JAX processes on this machine (multi-host without the hosts).

    python scripts/launch_multihost.py -n 2 --devices-per-process 4 -- \\
        python -m pikv_jax.moe.multihost_check --out /tmp/mh
    python scripts/launch_multihost.py --processes 2 generate --mesh data=2,model=4 --method "h2o@0.5"

After `--` comes any command; a subcommand instead names an entry point of this folder, given the
arguments after it: `generate` runs scripts/multihost_generate.py (sharded `PiKVModel.generate` on
one mesh over every process's devices; process 0 prints the ids as JSON), with 4 CPU devices per
process unless --devices-per-process says otherwise.

Each process gets PIKV_COORDINATOR=127.0.0.1:<free port>, PIKV_NUM_PROCESSES, PIKV_PROCESS_ID
(read by `pikv_jax.parallel.multihost.initialize`), JAX_PLATFORMS=cpu unless set, and with
--devices-per-process K the XLA flag that gives it K CPU devices. Output of every process is
printed with a "[pN]" prefix once it finishes. If a process fails or the timeout passes, the others
are stopped; the exit status is the first non-zero one (124 on timeout).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ENTRY_POINTS = {"generate": (HERE / "multihost_generate.py", 4)}  # subcommand -> (script, default devices/process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices_per_process: int | None) -> dict:
    env = dict(os.environ)
    env["PIKV_COORDINATOR"] = f"127.0.0.1:{port}"
    env["PIKV_NUM_PROCESSES"] = str(num_processes)
    env["PIKV_PROCESS_ID"] = str(process_id)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return env


def launch(command: list[str], num_processes: int, *, devices_per_process: int | None = None,
           port: int | None = None, timeout: float = 600.0, out=sys.stdout) -> int:
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("no command given: put it after `--`")
    port = port or free_port()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(num_processes)]  # files: no pipe can fill up
    procs = [subprocess.Popen(command, env=child_env(i, num_processes, port, devices_per_process),
                              stdout=logs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    status = 0
    killed = [False] * num_processes
    try:
        pending = set(range(num_processes))
        while pending:
            for i in sorted(pending):
                rc = procs[i].poll()
                if rc is not None:
                    pending.discard(i)
                    if rc and not status:
                        status = rc
            if status and pending:
                break  # one failed: the rest would wait forever for it
            if time.monotonic() > deadline:
                status = 124
                break
            time.sleep(0.05)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()  # only the processes this launcher started
                p.wait()
                killed[i] = True
    for i, log in enumerate(logs):
        log.seek(0)
        for line in log.read().splitlines() + (["[killed by launcher]"] if killed[i] else []):
            print(f"[p{i}] {line}", file=out)
        log.close()
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    else:
        command = []
    default_devices = None
    entry = next((i for i, a in enumerate(argv) if a in ENTRY_POINTS), None) if not command else None
    if entry is not None:
        script, default_devices = ENTRY_POINTS[argv[entry]]
        argv, command = argv[:entry], [sys.executable, str(script), *argv[entry + 1:]]
    p = argparse.ArgumentParser(description="Launch N JAX processes on this machine.",
                                epilog=f"then `-- command ...` or a subcommand: {', '.join(ENTRY_POINTS)}")
    p.add_argument("-n", "--num-processes", "--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=default_devices, help="CPU devices per process")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before every process is stopped")
    args = p.parse_args(argv)
    if command and command[0] == "python":
        command[0] = sys.executable
    return launch(command, args.num_processes, devices_per_process=args.devices_per_process, port=args.port,
                  timeout=args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
