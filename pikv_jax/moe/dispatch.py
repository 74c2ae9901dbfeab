"""Token dispatch for sparse MoE, as free functions shared by every router and MoE layer.

Two layouts of the same routing decision (`expert_idx i32[T, K]`, `gates f32[T, K]`, `active bool[T, K]`):

- Capacity (GShard / Switch Transformer): every expert gets a fixed number of slots C; a cumsum gives
  each assignment its queue position (no loops), assignments that find their expert full are dropped
  and counted. As the router contract it is one-hot dispatch/combine tensors [T, E, C]; the layers
  execute it as a scatter into [E * C] slots and a gather back. Static shapes everywhere, so it
  also shards with `all_to_all`.
- Dropless (MegaBlocks / `ragged_dot`): the T*K assignments are sorted by expert and the grouped matmul
  `jax.lax.ragged_dot` runs each expert on exactly its tokens; nothing is dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    *, min_capacity: int = 1) -> int:
    """Slots per expert: ceil(capacity_factor * T * K / E), at least `min_capacity`, at most T.

    An expert can never receive more than T assignments (a token picks distinct experts), so a
    capacity factor of E / K or more guarantees that nothing is dropped.
    """
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if min_capacity < 1:
        raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
    cap = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return int(max(1, min(max(cap, min_capacity), num_tokens)))


@struct.dataclass
class CapacityDispatch:
    """Capacity layout of one routing decision.

    dispatch: f32[T, E, C] 0/1; token t occupies slot c of expert e.
    combine:  f32[T, E, C] gate weight of that slot (0 where dispatch is 0).
    kept:     bool[T, K] the assignment found room (False: dropped or inactive).
    position: i32[T, K] position of the assignment in its expert's queue (may be >= C).
    dropped:  i32[] active assignments that found their expert full.
    """

    dispatch: jax.Array
    combine: jax.Array
    kept: jax.Array
    position: jax.Array
    dropped: jax.Array


def capacity_positions(expert_idx, active, num_experts: int, capacity: int):
    """Queue position of every assignment in its expert, with first-choice priority (GShard).

    1. one_hot[T, K, E] = one_hot(expert_idx) masked by `active`.
    2. Order assignments choice-major: all tokens' first choices, then all second choices, ...
       so a token's first choice is never dropped in favour of another token's second choice.
    3. position[T, K] = (cumsum of one_hot along that order) - 1, read at the chosen expert.
    4. kept = active & position < C.
    Returns (position i32[T, K], kept bool[T, K], dropped i32[]). Cost O(T K E), no [T, E, C] tensor.
    """
    t, k = expert_idx.shape
    onehot = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.int32) * active[..., None]  # [T, K, E]
    choice_major = jnp.swapaxes(onehot, 0, 1).reshape(k * t, num_experts)  # [K*T, E]
    ranks = (jnp.cumsum(choice_major, axis=0) - 1).reshape(k, t, num_experts)
    position = jnp.sum(jnp.swapaxes(ranks, 0, 1) * onehot, axis=-1)  # [T, K]
    kept = active & (position < capacity)
    return position, kept, jnp.sum(active & ~kept).astype(jnp.int32)


def capacity_dispatch(expert_idx, gates, active, num_experts: int, capacity: int) -> CapacityDispatch:
    """Builds the one-hot dispatch/combine tensors [T, E, C] of `capacity_positions`:

    dispatch[t, e, c] = sum_k kept[t, k] * (expert_idx[t, k] == e) * (position[t, k] == c) (one einsum);
    combine is the same sum weighted by gates[t, k]. These tensors are the router contract; the MoE
    layers execute the same plan with `slot_indices` (a scatter and a gather, O(T K H) instead of
    the O(T E C H) one-hot einsums).
    """
    position, kept, dropped = capacity_positions(expert_idx, active, num_experts, capacity)
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)  # [T, K, C]
    expert = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.float32) * kept[..., None]  # [T, K, E]
    dispatch = jnp.einsum("tke,tkc->tec", expert, slot)
    combine = jnp.einsum("tke,tkc->tec", expert * gates[..., None].astype(jnp.float32), slot)
    return CapacityDispatch(dispatch=dispatch, combine=combine, kept=kept, position=position, dropped=dropped)


def slot_indices(expert_idx, position, kept, capacity: int, num_experts: int):
    """i32[T, K]: flat slot e * C + position of each kept assignment, E * C (out of range) otherwise."""
    return jnp.where(kept, expert_idx * capacity + position, num_experts * capacity).astype(jnp.int32)


def scatter_to_slots(x, slots, num_slots: int):
    """x: [T, H], slots: i32[T, K] -> [num_slots, H] with x[t] at each of its slots (unused slots 0)."""
    t, k = slots.shape
    rows = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1])).reshape(t * k, -1)
    return jnp.zeros((num_slots, x.shape[-1]), x.dtype).at[slots.reshape(-1)].set(rows, mode="drop")


def gather_from_slots(y_slots, slots, weights):
    """y_slots: [num_slots, H]; slots, weights: [T, K] -> f32[T, H] = sum_k weights * y_slots[slots]
    (out-of-range slots contribute 0)."""
    picked = jnp.take(y_slots, slots, axis=0, mode="fill", fill_value=0)  # [T, K, H]
    return jnp.einsum("tkh,tk->th", picked.astype(jnp.float32), weights.astype(jnp.float32))


@struct.dataclass
class SortedDispatch:
    """Dropless layout: the T*K assignments sorted by expert.

    order:       i32[T*K] flat assignment index (t * K + k) of each sorted row.
    token:       i32[T*K] token index of each sorted row.
    group_sizes: i32[E] active assignments per expert (inactive ones sort last, outside every group).
    valid:       bool[T*K] sorted row belongs to an expert group.
    """

    order: jax.Array
    token: jax.Array
    group_sizes: jax.Array
    valid: jax.Array


def sort_by_expert(expert_idx, active, num_experts: int) -> SortedDispatch:
    """Sorts assignments by expert (stable), inactive assignments last.

    1. key[T*K] = expert_idx, or E for an inactive assignment.
    2. order = argsort(key) (stable: within an expert, tokens keep their order).
    3. group_sizes[e] = number of active assignments to e.
    """
    t, k = expert_idx.shape
    key = jnp.where(active, expert_idx, num_experts).reshape(t * k)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.sum(jax.nn.one_hot(key, num_experts, dtype=jnp.int32), axis=0)
    valid = jnp.arange(t * k) < jnp.sum(group_sizes)
    return SortedDispatch(order=order, token=order // k, group_sizes=group_sizes.astype(jnp.int32), valid=valid)


def unsort_and_combine(y_sorted, sorted_dispatch: SortedDispatch, gates, active):
    """y_sorted: [T*K, H] expert outputs in sorted order -> [T, H] = sum_k gates[t, k] * y[t, k]."""
    t, k = gates.shape
    y_sorted = jnp.where(sorted_dispatch.valid[:, None], y_sorted, 0)
    y = jnp.zeros_like(y_sorted).at[sorted_dispatch.order].set(y_sorted).reshape(t, k, -1)
    w = jnp.where(active, gates, 0.0).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), w)


def scatter_gates(expert_idx, gates, active, num_experts: int):
    """Dense gate matrix f32[T, E]: gates[t, k] placed at expert_idx[t, k] (0 elsewhere)."""
    onehot = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.float32) * active[..., None]
    return jnp.einsum("tke,tk->te", onehot, gates.astype(jnp.float32))


def tokens_per_expert(expert_idx, active, num_experts: int):
    """i32[E]: active assignments per expert (the load a router asked for, before capacity)."""
    onehot = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.int32) * active[..., None]
    return jnp.sum(onehot, axis=(0, 1))


__all__ = ["CapacityDispatch", "SortedDispatch", "capacity_dispatch", "capacity_positions", "expert_capacity",
           "gather_from_slots", "scatter_gates", "scatter_to_slots", "slot_indices", "sort_by_expert",
           "tokens_per_expert", "unsort_and_combine"]
