"""Sharded generation: a model's parameters and its KV cache placed on a device mesh.

Mesh axes (pikv_jax/parallel/mesh.py): `data` splits batch rows, `model` splits attention heads and
MLP hidden units (the parameter rules are in pikv_jax/parallel/sharding.py), `expert` splits MoE
expert weights. The jitted prefill and decode take these placements as their input shardings and
pin the loop state's on their outputs, so the donated cache stays in place and XLA inserts the
collectives (per layer, activation-sized all-reduces after the row-split projections, and
gathers of the new token's key/value rows for the cache's scatter writes).

Cache rules (`cache_shardings`): a leaf whose leading axis is the batch has its rows over `data`
(a leaf without one, such as the low-rank layout's per-head bases, is replicated). Per-head
layouts (`LayerCache`, the KIVI `QuantizedLayerCache`, low-rank) also split their KV-head axis
over `model` when the KV heads divide by its size, so each device stores the heads whose queries
it computes; otherwise the cache is replicated over `model` (the replicated-head layout, matching
the replicated attention of the parameter rules). Pooled layouts, whose slots mix heads, and
per-row state are split over `data` only.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pikv_jax.cache.state import KVCache, PerHeadSlotCache
from pikv_jax.config import ModelConfig
from pikv_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, MESH_AXES, MODEL_AXIS, SEQ_AXIS
from pikv_jax.parallel.sharding import global_array, shard_state, split_counts
from pikv_jax.runtime.generate import DecodeState


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of `axis` in `mesh` (1 when the mesh lacks it or there is no mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(axis, 1))


def model_counts(config: ModelConfig) -> dict[str, int]:
    """The group counts the parameter rules split by (KV heads, MLP hidden units, vocabulary, experts)."""
    return split_counts(num_kv_heads=config.num_key_value_heads,
                        intermediate_size=None if config.num_experts else config.intermediate_size,
                        vocab_size=config.vocab_size, num_experts=config.num_experts or None)


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """Raises a one-line ValueError for a mesh generation cannot use with this model: an axis name
    outside MESH_AXES, a `seq` axis larger than 1 (the split-K cache is not implemented), or a
    `model` axis that divides none of the KV heads, the query heads and the MLP hidden size (it
    would only replicate work)."""
    for name in mesh.axis_names:
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; allowed: {', '.join(MESH_AXES)}")
    if axis_size(mesh, SEQ_AXIS) > 1:
        raise ValueError(f"mesh axis {SEQ_AXIS!r} has size {axis_size(mesh, SEQ_AXIS)}; generation does not "
                         "split the cache's slot axis yet (use seq=1)")
    m = axis_size(mesh, MODEL_AXIS)
    if m > 1:
        hidden = None if config.num_experts else config.intermediate_size
        sizes = dict(kv_heads=config.num_key_value_heads, query_heads=config.num_attention_heads,
                     mlp_hidden=hidden)
        if not any(n and n % m == 0 for n in sizes.values()):
            shown = ", ".join(f"{k}={v}" for k, v in sizes.items() if v)
            raise ValueError(f"mesh axis {MODEL_AXIS!r} of size {m} divides none of {shown}; "
                             f"pick a size that divides one of them")


def place_params(params: nnx.State, config: ModelConfig, mesh: Mesh) -> nnx.State:
    """`params` (from `nnx.split`) placed on `mesh` under the parameter rules, after `check_mesh`."""
    check_mesh(config, mesh)
    return shard_state(params, mesh, counts=model_counts(config), expert_axis=EXPERT_AXIS, model_axis=MODEL_AXIS)


def _rows_axis(mesh: Mesh, batch: int, data_axis: str) -> str | None:
    """The mesh axis rows go over: `data_axis` when the mesh has it and it divides the batch."""
    return data_axis if data_axis in mesh.axis_names and batch % axis_size(mesh, data_axis) == 0 else None


def cache_shardings(cache: KVCache, mesh: Mesh, *, data_axis: str = DATA_AXIS, model_axis: str = MODEL_AXIS):
    """A pytree like `cache` (concrete, abstract or traced) of NamedShardings (see the module doc).

    A batch that the `data` axis does not divide is replicated over it (generate pads the batch so
    this does not happen); so are empty arrays (XLA places them replicated)."""
    batch = cache.batch
    m = axis_size(mesh, model_axis)
    rows = _rows_axis(mesh, batch, data_axis)
    head_axis = []
    for layer in cache.layers:
        split = isinstance(layer, PerHeadSlotCache) and model_axis in mesh.axis_names and layer.num_kv_heads % m == 0
        head_axis.append((model_axis, layer.num_kv_heads) if split else None)

    def spec(path, leaf) -> NamedSharding:
        shape = tuple(leaf.shape)
        if not shape or shape[0] != batch or 0 in shape:  # (XLA places empty arrays replicated)
            return NamedSharding(mesh, P())
        heads = None
        if isinstance(path[0], jax.tree_util.GetAttrKey) and path[0].name == "layers":
            heads = head_axis[path[1].idx]
        if heads is not None and len(shape) >= 2 and shape[1] == heads[1]:
            return NamedSharding(mesh, P(rows, heads[0]))
        return NamedSharding(mesh, P(rows))

    return jax.tree_util.tree_map_with_path(spec, cache)


def state_shardings(state: DecodeState, mesh: Mesh, *, data_axis: str = DATA_AXIS):
    """NamedShardings of a generation loop's carry (concrete, abstract or traced): the cache's from
    `cache_shardings`, per-row arrays (tokens, last, counts, finish reasons) over `data`, the step
    counter and the sampling key replicated."""
    batch = state.cache.batch
    rows = _rows_axis(mesh, batch, data_axis)
    cache = iter(jax.tree.leaves(cache_shardings(state.cache, mesh, data_axis=data_axis)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    out = []
    for path, leaf in leaves:
        if isinstance(path[0], jax.tree_util.GetAttrKey) and path[0].name == "cache":
            out.append(next(cache))
        elif leaf.ndim and leaf.shape[0] == batch and 0 not in leaf.shape:
            out.append(NamedSharding(mesh, P(rows)))
        else:
            out.append(NamedSharding(mesh, P()))
    return jax.tree_util.tree_unflatten(treedef, out)


def with_shardings(tree, shardings):
    """Abstract arrays (ShapeDtypeStructs) of `tree`'s shapes and dtypes carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Per-row inputs (tokens [B, S], lengths [B], ...): rows over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS if DATA_AXIS in mesh.axis_names else None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a host or single-device value every process holds in full) placed with `sharding`.

    One process: `jax.device_put`. A mesh over several processes: each process fills only its own
    shards from its copy (`global_array`; no cross-process check or transfer), and a PRNG key goes
    as its key data, wrapped again on the mesh (device_put refuses key arrays there)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(global_array(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    return global_array(x, sharding)


def to_host(x) -> np.ndarray:
    """`x` as one NumPy array. An array spread over several processes is gathered from all of them
    (`process_allgather`, a collective: every process must call it, in the same order); anything
    this process holds in full (one process, or fully replicated) is read directly."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_batch(batch: int, mesh: Mesh | None) -> int:
    """Rows generation runs for `batch` prompts: rounded up to a multiple of the `data` axis."""
    d = axis_size(mesh, DATA_AXIS)
    return math.ceil(batch / d) * d


def bytes_per_device(tree) -> int:
    """Largest number of bytes any one (addressable) device holds of `tree`'s arrays, measured from
    their shards (a replicated array counts in full on every device)."""
    per_device: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values(), default=0)


def mesh_summary(mesh: Mesh) -> dict[str, int]:
    """{axis name: size} in the mesh's axis order (what generate reports under stats["mesh"])."""
    return {str(k): int(v) for k, v in dict(mesh.shape).items()}


__all__ = ["axis_size", "batch_sharding", "bytes_per_device", "cache_shardings", "check_mesh", "mesh_summary",
           "model_counts", "padded_batch", "place_params", "put", "replicated", "state_shardings", "to_host",
           "with_shardings"]
