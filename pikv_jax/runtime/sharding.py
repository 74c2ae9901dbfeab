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

`seq` splits the slot axis (C) of per-head layouts contiguously: device s of the axis holds slots
[s * C/S, (s + 1) * C/S) of every (row, KV head). `LayerCache` splits k, v, pos, score and the
slot-grouped arrays of its policy state (per-slot arrays and Quest's page bounds, axis 2 of every
`extra` leaf of rank >= 3); the KIVI `QuantizedLayerCache` splits its quantized part (codes,
scales, minimums, positions: whole key groups per device) and keeps the full-precision ring, the
scores over [Cq + R] and the counters replicated over `seq`. Decode attention over a split slot
axis is exact: each device attends over its slots and XLA joins the softmax across devices.
`seq_capacities` rounds the capacities of a non-evicting policy up to a multiple of S (extra
slots only stay free); an evicting policy whose budget S does not divide is a ValueError, since
more slots would be a larger budget and change what it keeps.

`expert` splits an expert-sharded cache (PiKV's expert KV storage, cache/policies/expert_kv.py,
recognised by `expert_kv.slot_shards`): its slot axis holds G shards shard-major, so splitting k,
v, pos, score and the per-shard router state (centroids, load) over an `expert` axis of size E
dividing G gives each device G/E whole shards, about L/E tokens per layer. With `seq` as well the
slots go over (expert, seq): seq subdivides each device's shards. Other caches stay replicated
over `expert`.
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

from pikv_jax.cache.policies.expert_kv import SHARD_STATE, slot_shards
from pikv_jax.cache.quantized import QuantizedLayerCache
from pikv_jax.cache.state import KVCache, LayerCache, PerHeadSlotCache
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
    outside MESH_AXES, an `expert` axis that does not divide an MoE model's experts, or a `model`
    axis that divides none of the KV heads, the query heads and the MLP hidden size (it would only
    replicate work). On a dense model the `expert` axis splits `expert_kv`'s slot shards. A `seq`
    axis is checked against each cache's capacities when the cache is laid out (`cache_shardings`)."""
    for name in mesh.axis_names:
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; allowed: {', '.join(MESH_AXES)}")
    e = axis_size(mesh, EXPERT_AXIS)
    if e > 1 and config.num_experts and config.num_experts % e:
        raise ValueError(f"mesh axis {EXPERT_AXIS!r} of size {e} does not divide num_experts={config.num_experts}; "
                         "pick a size that divides it")
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


# fields split over `seq` on axis 2 (their slot axis, or key groups of whole slots); see the module doc
_SEQ_FIELDS = {LayerCache: ("k", "v", "pos", "score", "extra"),
               QuantizedLayerCache: ("kq", "vq", "v_scale", "v_min", "qpos", "k_scale", "k_min")}


def seq_units(layer) -> int | None:
    """The count the `seq` axis must divide for `layer` to split its slots: its capacity (a
    `LayerCache`), its quantized key groups (KIVI), or None when the layout keeps its slots whole
    (pooled, low-rank, a KIVI cache that is all ring)."""
    if type(layer) is LayerCache:
        return layer.capacity
    if type(layer) is QuantizedLayerCache and layer.quantized_slots:
        return layer.quantized_slots // layer.group_size
    return None


def check_seq(cache: KVCache, mesh: Mesh, *, seq_axis: str = SEQ_AXIS) -> None:
    """One-line ValueError when the mesh's `seq` axis does not divide a layer's slot count."""
    n = axis_size(mesh, seq_axis)
    if n == 1:
        return
    for i, layer in enumerate(cache.layers):
        units = seq_units(layer)
        if units is not None and units % n:
            what = "key groups" if type(layer) is QuantizedLayerCache else "slots"
            raise ValueError(f"mesh axis {seq_axis!r} of size {n} does not divide layer {i}'s cache of {units} "
                             f"{what}; pick a seq size that divides it, or a budget that is a multiple of {n}")


def seq_capacities(capacities: tuple[int, ...], evicts: bool, mesh: Mesh | None, *,
                   seq_axis: str = SEQ_AXIS) -> tuple[int, ...]:
    """Capacities for a mesh with a `seq` axis of size S: a non-evicting policy's rounded up to a
    multiple of S (the extra slots stay free, so nothing it keeps changes); an evicting policy's
    unchanged (its capacity is its budget; `check_seq` rejects one S does not divide)."""
    n = axis_size(mesh, seq_axis)
    if n == 1 or evicts:
        return tuple(capacities)
    return tuple(math.ceil(c / n) * n for c in capacities)


def check_expert_axis(cache: KVCache, config: ModelConfig, mesh: Mesh, *, expert_axis: str = EXPERT_AXIS) -> None:
    """One-line ValueError for an `expert` axis with nothing to split: a dense model (no expert
    weights) whose cache has no expert_kv slot shards would only repeat its work on every device."""
    e = axis_size(mesh, expert_axis)
    if e > 1 and not config.num_experts and not any(slot_shards(layer) for layer in cache.layers):
        raise ValueError(f"mesh axis {expert_axis!r} of size {e} splits nothing here: the model has no experts and "
                         "the cache no expert_kv shards; use it with an MoE model or expert_kv(shards=...), or drop it")


def expert_slot_split(cache: KVCache, mesh: Mesh, *, expert_axis: str = EXPERT_AXIS,
                      seq_axis: str = SEQ_AXIS) -> tuple[bool, ...]:
    """Per layer, whether its slots go over `expert` (an expert-sharded cache on a mesh whose expert
    axis is larger than 1); one-line ValueError when that axis does not divide its shard count, or
    when (expert x seq) does not divide its slots."""
    e, n = axis_size(mesh, expert_axis), axis_size(mesh, seq_axis)
    out = []
    for i, layer in enumerate(cache.layers):
        g = slot_shards(layer) if e > 1 else None
        if g is not None and g % e:
            raise ValueError(f"mesh axis {expert_axis!r} of size {e} does not divide layer {i}'s {g} KV shards; "
                             f"pick expert_kv shards that are a multiple of {e}")
        if g is not None and layer.capacity % (e * n):
            raise ValueError(f"mesh axes {expert_axis!r} x {seq_axis!r} ({e} x {n}) do not divide layer {i}'s "
                             f"cache of {layer.capacity} slots; pick a budget that is a multiple of {e * n}")
        out.append(g is not None)
    return tuple(out)


def cache_shardings(cache: KVCache, mesh: Mesh, *, data_axis: str = DATA_AXIS, model_axis: str = MODEL_AXIS,
                    seq_axis: str = SEQ_AXIS, expert_axis: str = EXPERT_AXIS):
    """A pytree like `cache` (concrete, abstract or traced) of NamedShardings (see the module doc).

    A batch that the `data` axis does not divide is replicated over it (generate pads the batch so
    this does not happen); so are empty arrays (XLA places them replicated). A `seq` axis that
    does not divide a layer's slots is a ValueError (`check_seq`)."""
    check_seq(cache, mesh, seq_axis=seq_axis)
    batch = cache.batch
    m = axis_size(mesh, model_axis)
    rows = _rows_axis(mesh, batch, data_axis)
    seq = seq_axis if axis_size(mesh, seq_axis) > 1 else None
    by_expert = expert_slot_split(cache, mesh, expert_axis=expert_axis, seq_axis=seq_axis)
    head_axis, slot_fields = [], []
    for layer in cache.layers:
        split = isinstance(layer, PerHeadSlotCache) and model_axis in mesh.axis_names and layer.num_kv_heads % m == 0
        head_axis.append((model_axis, layer.num_kv_heads) if split else None)
        slot_fields.append(_SEQ_FIELDS[type(layer)] if seq and seq_units(layer) else ())

    def spec(path, leaf) -> NamedSharding:
        shape = tuple(leaf.shape)
        if not shape or shape[0] != batch or 0 in shape:  # (XLA places empty arrays replicated)
            return NamedSharding(mesh, P())
        heads, slots = None, None
        if isinstance(path[0], jax.tree_util.GetAttrKey) and path[0].name == "layers":
            i = path[1].idx
            heads = head_axis[i]
            field = path[2].name if len(path) > 2 and isinstance(path[2], jax.tree_util.GetAttrKey) else None
            if by_expert[i]:  # whole shards per device (module doc); the router's counters stay replicated
                key = path[3].key if field == "extra" and isinstance(path[3], jax.tree_util.DictKey) else None
                slots = ((expert_axis, seq) if seq else expert_axis) if field in ("k", "v", "pos", "score") \
                    else expert_axis if key in SHARD_STATE else None
            elif field in slot_fields[i] and len(shape) >= 3 and shape[2] % axis_size(mesh, seq_axis) == 0:
                slots = seq
        if heads is not None and len(shape) >= 2 and shape[1] == heads[1]:
            return NamedSharding(mesh, P(rows, heads[0], slots) if slots else P(rows, heads[0]))
        if slots:
            return NamedSharding(mesh, P(rows, None, slots))
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


__all__ = ["axis_size", "batch_sharding", "bytes_per_device", "cache_shardings", "check_expert_axis", "check_mesh",
           "check_seq", "expert_slot_split", "mesh_summary", "model_counts", "padded_batch", "place_params", "put",
           "replicated", "seq_capacities", "seq_units", "state_shardings", "to_host", "with_shardings"]
