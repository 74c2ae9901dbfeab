"""Jitted generation: one compiled prefill, then one compiled `lax.while_loop` over decode steps.

The loop carries a typed `DecodeState` (cache included) that is donated, so the cache is updated in
place. Per row it stops on a stop token, at `max_new_tokens`, or when a non-evicting cache has no
free slot left ("cache full"). Nothing leaves the device inside the loop unless a streaming
callback is given, in which case each step's tokens go to the host through an ordered io_callback.
"""

# ruff: noqa: F722
# (jaxtyping shape strings such as "b n" are not forward references)

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jaxtyping import Array, Int32, PRNGKeyArray

from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.state import KVCache, pytree_dataclass
from pikv_jax.runtime import forward
from pikv_jax.sampling import SamplingConfig, sample

RUNNING, STOP_TOKEN, MAX_TOKENS, CACHE_FULL = 0, 1, 2, 3
FINISH_REASONS = {RUNNING: "running", STOP_TOKEN: "stop_token", MAX_TOKENS: "max_tokens", CACHE_FULL: "cache_full"}


@pytree_dataclass
class DecodeState:
    """Loop carry. tokens: i32[B, N] generated ids (-1 past each row's end)."""

    step: Int32[Array, ""]  # decode iterations run
    last: Int32[Array, " b"]  # token to feed next
    tokens: Int32[Array, "b n"]
    num_generated: Int32[Array, " b"]
    finish: Int32[Array, " b"]  # one of FINISH_REASONS (RUNNING while active)
    cache: KVCache
    key: PRNGKeyArray  # sampling seed (a typed key or a raw uint32[2] key)

    @property
    def done(self):
        return self.finish != RUNNING


def has_room(cache: KVCache, policy: CachePolicy) -> jax.Array:
    """bool[B]: every layer can take the next token of the row (always True when evicting)."""
    room = [policy.has_room(i, layer) for i, layer in enumerate(cache.layers)]
    return functools.reduce(jnp.logical_and, room)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationLoop:
    """The static part of generation; its jitted methods compile once per input shape."""

    graphdef: nnx.GraphDef
    policy: CachePolicy
    sampling: SamplingConfig
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    callback: Callable | None = None  # callback(step, tokens i32[B], emitted bool[B]) on the host

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    def _is_stop(self, tok):
        if not self.stop_ids:
            return jnp.zeros(tok.shape, bool)
        return jnp.isin(tok, jnp.asarray(self.stop_ids, jnp.int32))

    def _emit(self, state: DecodeState, tok, emitted) -> DecodeState:
        """Appends `tok` to rows where `emitted`, then updates finish reasons."""
        b = tok.shape[0]
        idx = jnp.where(emitted, state.num_generated, self.max_new_tokens)  # out of range -> dropped
        tokens = state.tokens.at[jnp.arange(b), idx].set(tok, mode="drop")
        n = state.num_generated + emitted.astype(jnp.int32)
        finish = state.finish
        finish = jnp.where(emitted & (n >= self.max_new_tokens), MAX_TOKENS, finish)
        finish = jnp.where(emitted & self._is_stop(tok), STOP_TOKEN, finish)
        if self.callback is not None:
            io_callback(self.callback, None, state.step, tok, emitted, ordered=True)
        return dataclasses.replace(state, tokens=tokens, num_generated=n, finish=finish,
                                   last=jnp.where(emitted, tok, state.last))

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
    def prefill(self, params, tokens, lengths, cache: KVCache, key, suffix=None, suffix_lengths=None) -> DecodeState:
        """Prompt pass and first sampled token. tokens: i32[B, S] right-padded; lengths: i32[B].

        suffix / suffix_lengths (i32[B, T], i32[B]): tokens fed after the prompt has been compressed
        by the policy and before sampling starts (e.g. a question asked of a compressed context).
        """
        model = nnx.merge(self.graphdef, params)
        logits, cache = forward.prefill(model, tokens, lengths, cache, self.policy)
        if suffix is not None:
            last, _, cache = forward.extend(model, cache, suffix, suffix_lengths, self.policy)
            logits = jnp.where((suffix_lengths > 0)[:, None], last, logits)
        b = tokens.shape[0]
        state = DecodeState(step=jnp.zeros((), jnp.int32), last=jnp.zeros((b,), jnp.int32),
                            tokens=jnp.full((b, self.max_new_tokens), -1, jnp.int32),
                            num_generated=jnp.zeros((b,), jnp.int32),
                            finish=jnp.full((b,), RUNNING, jnp.int32), cache=cache, key=key)
        tok = sample(logits, self.sampling, key, 0)
        return self._emit(state, tok, jnp.ones((b,), bool))

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
    def decode(self, params, state: DecodeState) -> DecodeState:
        """Decode steps until every row has finished."""
        model = nnx.merge(self.graphdef, params)

        def cond(s: DecodeState):
            return jnp.any(~s.done)

        def body(s: DecodeState):
            s = dataclasses.replace(s, step=s.step + 1)
            full = ~s.done & ~has_room(s.cache, self.policy)
            s = dataclasses.replace(s, finish=jnp.where(full, CACHE_FULL, s.finish))
            active = ~s.done
            logits, cache, wrote = forward.decode_step(model, s.cache, s.last, active, self.policy)
            s = dataclasses.replace(s, cache=cache)
            tok = sample(logits, self.sampling, s.key, s.step)
            return self._emit(s, tok, active & wrote)

        return jax.lax.while_loop(cond, body, state)


def pad_prompts(prompts: list[list[int]], *, pad_id: int = 0, multiple: int = 64):
    """Right-pads token lists to a common length rounded up to `multiple` (bounds recompilation).

    Returns (tokens i32[B, S], lengths i32[B]) as host arrays.
    """
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    s = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), s), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)
