"""Composition of a prefill-time selector with a decode-time evictor, e.g. SnapKV at prefill and
H2O during decode: the prefill policy chooses which prompt tokens enter the cache (and how many,
per layer), the decode policy gives them their initial scores and owns every decode-time hook."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pikv_jax.cache import ops
from pikv_jax.cache.policies.base import CachePolicy, PrefillContext, select_top
from pikv_jax.cache.state import LayerCache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Composite(CachePolicy):
    """prefill_policy: selects kept prompt tokens (its budget decides how many).
    decode_policy: scores and evicts at decode (its decode_evict / evict_every apply)."""

    name: ClassVar[str] = "composite"
    prefill_policy: CachePolicy
    decode_policy: CachePolicy

    def __post_init__(self):
        for role, p in (("prefill_policy", self.prefill_policy), ("decode_policy", self.decode_policy)):
            if p.layout != "uniform":
                raise ValueError(f"Composite: {role}={p.label} uses its own cache layout and cannot be composed; "
                                 "use it on its own")
        if not self.prefill_policy.has_budget:
            raise ValueError("Composite: prefill_policy needs a budget (budget_ratio or budget_tokens)")
        if self.prefill_policy.stores_raw_keys or self.decode_policy.stores_raw_keys:
            raise ValueError("Composite: policies that re-index positions cannot be composed")
        object.__setattr__(self, "group_reduce", self.decode_policy.group_reduce)

    @property
    def label(self) -> str:
        return f"{self.prefill_policy.name}+{self.decode_policy.name}"

    @property
    def has_budget(self) -> bool:
        return True

    @property
    def evicts(self) -> bool:
        return self.decode_policy.evicts

    def layer_budget(self, layer, prompt_len):
        return self.prefill_policy.layer_budget(layer, prompt_len)

    def row_budget(self, layer, lengths, prompt_len):
        return self.prefill_policy.row_budget(layer, lengths, prompt_len)

    def capacity_for(self, layer, prompt_len, max_new_tokens):
        if self.decode_policy.decode_evict:
            kept = self.prefill_policy.decode_budget(layer, prompt_len, max_new_tokens)
            return kept + self.decode_policy.evict_every - 1
        return self.layer_budget(layer, prompt_len) + max_new_tokens

    def init_layer_cache(self, layer, batch, num_kv_heads, capacity, head_dim, dtype):
        return self.decode_policy.init_layer_cache(layer, batch, num_kv_heads, capacity, head_dim, dtype)

    def has_room(self, layer, cache):
        return self.decode_policy.has_room(layer, cache)

    def prefill_mass_from(self, lengths):
        m = self.prefill_policy.prefill_mass_from(lengths)
        return m if m is not None else self.decode_policy.prefill_mass_from(lengths)

    def prefill(self, layer: int, cache: LayerCache, ctx: PrefillContext, *, scores=None) -> LayerCache:
        p = self.prefill_policy
        s = ctx.prompt_len
        init = self.decode_policy.initial_scores(layer, ctx)
        if p.keeps_whole_prompt(s):
            return ops.write_prompt(cache, ctx.k, ctx.v, ctx.pos, score=init)
        budget = p.layer_budget(layer, s)
        idx, ok = select_top(p.prefill_scores(layer, ctx) if scores is None else scores, ctx.pos, ctx.lengths,
                             budget, p.row_budget(layer, ctx.lengths, s), n_sink=p.n_sink,
                             window=p.recent_window(budget))
        return ops.gather_prompt(cache, ctx.k, ctx.v, ctx.pos, idx, ok, score=init)

    def decode_slot(self, layer, cache, q_pos):
        return self.decode_policy.decode_slot(layer, cache, q_pos)

    def write(self, layer, cache, k, v, q_pos, slot, active):
        return self.decode_policy.write(layer, cache, k, v, q_pos, slot, active)

    def attend(self, layer, cache, q, q_pos, *, sliding_window=None, inv_freq=None):
        return self.decode_policy.attend(layer, cache, q, q_pos, sliding_window=sliding_window, inv_freq=inv_freq)

    def observe(self, layer, cache, mass, q_pos, active):
        return self.decode_policy.observe(layer, cache, mass, q_pos, active)
