"""The device side of the serving engine: a fixed pool of B cache slots and three jitted programs.

`admit` prefills one request (batch of one, its own prompt-width bucket) into a fresh cache of the
pool's per-slot capacities, samples its first token and writes the row into slot `i` of the pool;
`decode` runs N decode steps for every occupied slot at once; `release` frees a slot. Every
per-request setting (max_new_tokens, stop ids, sampling, seed) is an array in `SlotState`, so
admitting a request never recompiles: one `admit` program per prompt bucket, one `decode`.

A slot's row follows the same steps as `PiKVModel.generate` on that request alone: the same
prefill, the same decode step and sampling key per token (fold_in(fold_in(key(seed), 0), t) for
token t), so greedy outputs are token for token those of `generate` (tests/serve).
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b k" are not forward references)

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int32, PRNGKeyArray

from pikv_jax.cache.policies.base import CachePolicy, init_policy_cache
from pikv_jax.cache.state import KVCache, pytree_dataclass
from pikv_jax.runtime import forward
from pikv_jax.runtime.generate import CACHE_FULL, MAX_TOKENS, RUNNING, STOP_TOKEN, has_room
from pikv_jax.sampling import sample_rows

IDLE = -1  # finish code of a slot that holds no request
NO_TOKEN = -1  # decode output where a slot emitted nothing


@pytree_dataclass
class SlotState:
    """The pool: one row per slot. finish is RUNNING while the slot decodes, IDLE when empty,
    else the finish reason of the request it held (runtime.generate.FINISH_REASONS)."""

    cache: KVCache
    last: Int32[Array, " b"]  # token to feed next
    num_generated: Int32[Array, " b"]
    max_new: Int32[Array, " b"]
    finish: Int32[Array, " b"]
    stop: Int32[Array, "b k"]  # stop ids, -1 padded
    temperature: Float[Array, " b"]
    top_k: Int32[Array, " b"]
    top_p: Float[Array, " b"]
    key: PRNGKeyArray  # one key per slot: fold_in(key(seed), 0) of its request


@pytree_dataclass
class RowSettings:
    """One request's decode settings, as device scalars (traced, so any values share a program)."""

    max_new: Int32[Array, ""]
    stop: Int32[Array, " k"]
    temperature: Float[Array, ""]
    top_k: Int32[Array, ""]
    top_p: Float[Array, ""]
    key: PRNGKeyArray


def row_settings(*, max_new_tokens: int, stop_ids, temperature: float, top_k: int, top_p: float, seed: int,
                 max_stop_ids: int) -> RowSettings:
    """Host values -> RowSettings (stop ids padded with -1 to `max_stop_ids`)."""
    stop = list(stop_ids) + [-1] * (max_stop_ids - len(stop_ids))
    return RowSettings(max_new=jnp.int32(max_new_tokens), stop=jnp.asarray(stop, jnp.int32),
                       temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                       key=jax.random.fold_in(jax.random.key(seed), 0))


def _emit(s: SlotState, tok, emitted) -> SlotState:
    """Counts `tok` for rows where `emitted` and sets their finish reasons (as generate does)."""
    n = s.num_generated + emitted.astype(jnp.int32)
    finish = jnp.where(emitted & (n >= s.max_new), MAX_TOKENS, s.finish)
    is_stop = jnp.any((tok[:, None] == s.stop) & (s.stop >= 0), axis=-1)
    finish = jnp.where(emitted & is_stop, STOP_TOKEN, finish)
    return s.replace(num_generated=n, finish=finish, last=jnp.where(emitted, tok, s.last))


def resident_entries(cache: KVCache):
    """i32[B]: resident (layer, KV head, token) entries per row (evictions = seen x L x Hkv - this)."""
    return sum(jnp.sum(layer.head_positions() >= 0, axis=(1, 2)).astype(jnp.int32) for layer in cache.layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotPrograms:
    """The static part of the pool (hashable: its jitted methods compile once per shape).

    capacities: per-layer slots of every pool row (the policy's capacity for the longest prompt
    bucket and the largest max_new_tokens the engine accepts). batched: per cache leaf (tree
    order), whether it has a leading batch axis (a leaf without one, such as a RoPE frequency
    table, is the same for every row)."""

    graphdef: nnx.GraphDef
    policy: CachePolicy
    capacities: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    cache_dtype: str
    batched: tuple[bool, ...]

    def empty_row_cache(self) -> KVCache:
        return init_policy_cache(self.policy, 1, self.capacities, num_kv_heads=self.num_kv_heads,
                                 head_dim=self.head_dim, dtype=jnp.dtype(self.cache_dtype))

    def prefill_row(self, params, tokens, lengths):
        """tokens i32[1, S], lengths i32[1] -> (logits f32[1, V], the row's cache)."""
        model = nnx.merge(self.graphdef, params)
        return forward.prefill(model, tokens, lengths, self.empty_row_cache(), self.policy)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def admit(self, params, state: SlotState, slot, tokens, lengths, row: RowSettings):
        """Prefills one request and writes it into `slot` (i32 scalar) -> (state, first token i32,
        its finish code i32)."""
        logits, cache = self.prefill_row(params, tokens, lengths)
        tok = sample_rows(logits, row.temperature[None], row.top_k[None], row.top_p[None],
                          jax.random.fold_in(row.key, 0)[None])

        def put(pool_leaf, row_leaf, batched):
            if not batched:
                return row_leaf.astype(pool_leaf.dtype)
            return jax.lax.dynamic_update_slice_in_dim(pool_leaf, row_leaf.astype(pool_leaf.dtype), slot, axis=0)

        leaves, treedef = jax.tree_util.tree_flatten(state.cache)
        row_leaves = treedef.flatten_up_to(cache)
        cache = treedef.unflatten([put(a, b, m) for a, b, m in zip(leaves, row_leaves, self.batched)])

        def set_row(x, value):
            return x.at[slot].set(value)

        s = state.replace(cache=cache, last=set_row(state.last, 0), num_generated=set_row(state.num_generated, 0),
                          max_new=set_row(state.max_new, row.max_new), finish=set_row(state.finish, RUNNING),
                          stop=set_row(state.stop, row.stop), temperature=set_row(state.temperature, row.temperature),
                          top_k=set_row(state.top_k, row.top_k), top_p=set_row(state.top_p, row.top_p),
                          key=set_row(state.key, row.key))
        emitted = jnp.arange(s.finish.shape[0]) == slot
        s = _emit(s, jnp.full(s.last.shape, tok[0]), emitted)
        return s, tok[0], s.finish[slot]

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
    def decode(self, steps: int, params, state: SlotState):
        """`steps` decode steps for every running slot (one compiled loop; steps after every slot
        has finished cost a branch each). -> (state, tokens i32[steps, B] with NO_TOKEN where a
        slot emitted nothing, resident entries i32[B] after the last step)."""
        model = nnx.merge(self.graphdef, params)

        def step(s: SlotState, _):
            def run(s: SlotState):
                full = (s.finish == RUNNING) & ~has_room(s.cache, self.policy)
                s = s.replace(finish=jnp.where(full, CACHE_FULL, s.finish))
                active = s.finish == RUNNING
                logits, cache, wrote = forward.decode_step(model, s.cache, s.last, active, self.policy)
                keys = jax.vmap(jax.random.fold_in)(s.key, s.num_generated)
                tok = sample_rows(logits, s.temperature, s.top_k, s.top_p, keys)
                emitted = active & wrote
                return _emit(s.replace(cache=cache), tok, emitted), jnp.where(emitted, tok, NO_TOKEN)

            idle = jnp.full(s.last.shape, NO_TOKEN, jnp.int32)
            return jax.lax.cond(jnp.any(s.finish == RUNNING), run, lambda s: (s, idle), s)

        state, out = jax.lax.scan(step, state, None, length=steps)
        return state, out, resident_entries(state.cache)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def release(self, state: SlotState, slot) -> SlotState:
        """Frees `slot` (a cancelled request stops decoding at once)."""
        return state.replace(finish=state.finish.at[slot].set(IDLE))


def cache_layout(programs: SlotPrograms, params, prompt_width: int) -> tuple[tuple[bool, ...], object, object]:
    """(batched flags per cache leaf, abstract row cache, abstract two-row cache) after a prefill
    of `prompt_width` tokens: the prefill may add policy state to the cache (query statistics, ...),
    so the pool is shaped like a prefilled cache, and a leaf is batched when its leading axis grows
    with the batch."""
    def shaped(batch):
        tokens = jax.ShapeDtypeStruct((batch, prompt_width), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)

        def run(params, tokens, lengths):
            model = nnx.merge(programs.graphdef, params)
            cache = init_policy_cache(programs.policy, batch, programs.capacities,
                                      num_kv_heads=programs.num_kv_heads, head_dim=programs.head_dim,
                                      dtype=jnp.dtype(programs.cache_dtype))
            return forward.prefill(model, tokens, lengths, cache, programs.policy)[1]

        return jax.eval_shape(run, params, tokens, lengths)

    one, two = shaped(1), shaped(2)
    flags = tuple(a.shape[:1] == (1,) and b.shape[:1] == (2,) and a.shape[1:] == b.shape[1:]
                  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)))
    return flags, one, two


def empty_pool(row_cache, batched: tuple[bool, ...], num_slots: int, max_stop_ids: int) -> SlotState:
    """A pool of `num_slots` idle slots shaped like the abstract prefilled row cache."""
    leaves, treedef = jax.tree_util.tree_flatten(row_cache)
    cache = treedef.unflatten([jnp.zeros((num_slots,) + x.shape[1:] if m else x.shape, x.dtype)
                               for x, m in zip(leaves, batched)])
    b = num_slots
    return SlotState(cache=cache, last=jnp.zeros((b,), jnp.int32), num_generated=jnp.zeros((b,), jnp.int32),
                     max_new=jnp.ones((b,), jnp.int32), finish=jnp.full((b,), IDLE, jnp.int32),
                     stop=jnp.full((b, max_stop_ids), -1, jnp.int32), temperature=jnp.zeros((b,), jnp.float32),
                     top_k=jnp.zeros((b,), jnp.int32), top_p=jnp.ones((b,), jnp.float32),
                     key=jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32)))


__all__ = ["IDLE", "NO_TOKEN", "RowSettings", "SlotPrograms", "SlotState", "cache_layout", "empty_pool",
           "resident_entries", "row_settings"]
