"""Multi-process self-check of expert parallelism: every process runs this module, they form one
("data", "expert") mesh over all their devices, run `DistributedPiKVMoE`, and compare the gathered
output with a single-device `PiKVMoE` each process computes locally.

    python scripts/launch_multihost.py -n 2 --devices-per-process 4 -- \\
        python -m pikv_jax.moe.multihost_check --out /tmp/mh

Writes `{out}/process_{i}.json` per process with the largest absolute difference per case.
Cases: "balanced" (capacity large enough that nothing drops: equals the ungrouped layer) and
"skewed" (router biased towards one expert, tight capacity, drops: equals PiKVMoE with one capacity
group per device).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.moe.distributed import DistributedPiKVMoE, place_on_mesh
from pikv_jax.moe.pikv_moe import PiKVMoE
from pikv_jax.parallel.mesh import expert_mesh
from pikv_jax.parallel.multihost import initialize
from pikv_jax.parallel.sharding import global_array


def _cases():
    return {
        "balanced": dict(capacity_factor=8.0, skew=0.0, grouped=False),
        "skewed": dict(capacity_factor=1.0, skew=3.0, grouped=True),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for process_{i}.json")
    p.add_argument("--data", type=int, default=2, help="size of the data mesh axis")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    args = p.parse_args(argv)


    pid, nproc = initialize()  # before anything touches the devices



    devices = jax.devices()
    if len(devices) % args.data:
        raise ValueError(f"--data={args.data} does not divide the {len(devices)} devices")
    mesh = expert_mesh(args.data, len(devices) // args.data)
    n_dev = len(devices)
    result = dict(process_id=pid, num_processes=nproc, num_devices=n_dev, local_devices=jax.local_device_count(),
                  mesh=dict(mesh.shape), cases={})
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((args.tokens, args.hidden)).astype(np.float32)
    for name, case in _cases().items():
        kw = dict(rank=2, alpha=4.0, capacity_factor=case["capacity_factor"])
        groups = n_dev if case["grouped"] else 1
        single = PiKVMoE(args.hidden, args.experts, 2, rngs=nnx.Rngs(0), num_groups=groups, **kw)
        b = jax.random.normal(jax.random.key(1), single.experts.gate_proj_lora_b[...].shape) * 0.1
        single.experts.gate_proj_lora_b[...] = b  # exercise the LoRA path too
        x = x_host + case["skew"] * np.asarray(single.router.gate.kernel[...])[:, 0]
        y_ref, aux_ref = single.forward(jnp.asarray(x))
        dist = DistributedPiKVMoE(args.hidden, args.experts, 2, rngs=nnx.Rngs(0), mesh=mesh, **kw)
        nnx.update(dist, nnx.state(single))
        place_on_mesh(dist)
        graphdef, state = nnx.split(dist)
        x_global = global_array(x, NamedSharding(mesh, P(("data", "expert"))))

        @jax.jit
        def run(state, x):
            y, aux = nnx.merge(graphdef, state).forward(x)
            return y, aux.stats["dropped"]

        y, dropped = run(state, x_global)
        y_all = np.asarray(multihost_utils.process_allgather(y, tiled=True))
        result["cases"][name] = dict(
            max_abs_diff=float(np.max(np.abs(y_all - np.asarray(y_ref)))),
            dropped=int(np.asarray(dropped.addressable_data(0))),
            dropped_single=int(np.asarray(aux_ref.stats["dropped"])),
            output_shape=list(y_all.shape))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"process_{pid}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
