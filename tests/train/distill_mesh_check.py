"""Run as a subprocess by test_distill_sharding.py: 8 simulated CPU devices must be configured before jax
starts. Prints one JSON line with what it measured; exits non-zero on a failed check."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from distill_helpers import CONFIGS, TINY_LORA, checkpoint_state  # noqa: E402

from pikv_jax.parallel.mesh import make_mesh  # noqa: E402
from pikv_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: E402
from pikv_jax.train.config import load_config  # noqa: E402
from pikv_jax.train.trainer import train  # noqa: E402


def spec_for(shape, axes: dict[str, int]) -> P:
    """Shards the first dimensions divisible by each mesh axis size (in order), else replicates."""
    spec = [None] * len(shape)
    used = set()
    for name, size in axes.items():
        for i, n in enumerate(shape):
            if i not in used and n % size == 0 and n >= size:
                spec[i] = name
                used.add(i)
                break
    return P(*spec)


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    out: dict = {}
    tmp = pathlib.Path(tempfile.mkdtemp())
    over = [*TINY_LORA, "data.batch_size=8", "eval.batches=0", "train.steps=3",
            "checkpoint.every=1", "lora.init=random"]
    # 1) data parallelism: the batch split over 8 devices gives the single-device update
    s8 = train(load_config(CONFIGS / "distill_lora.yaml", over), tmp / "dp8", progress=False)
    s1 = train(load_config(CONFIGS / "distill_lora.yaml", [*over, "mesh.data=1"]), tmp / "dp1", progress=False)
    assert s8["data_parallel"] == 8 and s1["data_parallel"] == 1, (s8["data_parallel"], s1["data_parallel"])
    p8, p1 = checkpoint_state(tmp / "dp8")["params"], checkpoint_state(tmp / "dp1")["params"]
    out["dp_max_abs_diff"] = max(float(np.max(np.abs(p8[k] - p1[k]))) for k in p8)
    assert out["dp_max_abs_diff"] < 1e-5, out

    # 2) a state sharded one way (8 devices, one axis) restores into another sharding (2 x 4 mesh) and one device
    host = checkpoint_state(tmp / "dp8")
    mesh_a = make_mesh((8,), ("x",))
    mesh_b = make_mesh((2, 4), ("a", "b"))
    place_a = lambda x: NamedSharding(mesh_a, spec_for(np.shape(x), {"x": 8}))  # noqa: E731
    state_a = jax.tree.map(lambda x: jax.device_put(np.asarray(x), place_a(x)), host)
    sharded = [x for x in jax.tree.leaves(state_a) if len(x.sharding.device_set) == 8 and
               x.addressable_shards[0].data.shape != x.shape]
    assert sharded, "nothing was sharded on the first mesh"
    ck = Checkpointer(tmp / "resharded", every=1)
    ck.save(3, state_a, force=True)

    place_b = lambda x: NamedSharding(mesh_b, spec_for(x.shape, {"a": 2, "b": 4}))  # noqa: E731
    restored_b, meta = Checkpointer(tmp / "resharded").restore(abstract_like(state_a, place_b))
    one = SingleDeviceSharding(jax.devices()[3])
    restored_1, _ = Checkpointer(tmp / "resharded").restore(abstract_like(state_a, lambda x: one))
    n_changed = 0
    for a, b, c in zip(jax.tree.leaves(state_a), jax.tree.leaves(restored_b), jax.tree.leaves(restored_1)):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
        assert b.sharding.is_equivalent_to(place_b(a), a.ndim), (b.sharding, place_b(a))
        assert c.sharding == one
        n_changed += int(not b.sharding.is_equivalent_to(a.sharding, a.ndim))
    assert n_changed > 0, "the second sharding equals the first: the test would prove nothing"
    out.update(resharded_leaves=n_changed, leaves=len(jax.tree.leaves(state_a)), step=meta["step"])
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
