"""Budgets of a serving pool: a ratio is a fraction of the slot, not of each prompt.

A pool gives every slot the same memory, sized for the longest prompt it accepts. A policy's
ratio budget (h2o@0.25) therefore becomes a token budget of ceil(ratio x max_prompt_tokens):
a request at the longest prompt keeps exactly what `generate` keeps for it under the ratio, and a
shorter one may keep up to the same number of tokens (the slot's memory is reserved either way).
With token budgets a request's results do not depend on the slot's size, so a row of the pool
equals `PiKVModel.generate` of that request alone under the converted policy (`slot_policy`).
"""

from __future__ import annotations

import dataclasses
import math

from pikv_jax.cache.policies.base import CachePolicy, map_policies


def slot_policy(policy: CachePolicy, max_prompt_tokens: int) -> CachePolicy:
    """`policy` with every ratio budget (its own and those of nested policies) replaced by the
    token budget ceil(ratio x max_prompt_tokens); a ratio of 1 keeps every prompt token."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")

    def convert(p: CachePolicy) -> CachePolicy:
        ratio = getattr(p, "budget_ratio", None)
        if ratio is None:
            return p
        if ratio == 1.0:
            return dataclasses.replace(p, budget_ratio=None)
        tokens = math.ceil(ratio * max_prompt_tokens - 1e-9)
        try:
            return dataclasses.replace(p, budget_ratio=None, budget_tokens=tokens)
        except ValueError as e:
            raise ValueError(f"budget {ratio} of max_prompt_tokens={max_prompt_tokens} is {tokens} tokens per "
                             f"slot, too few for {p.name}: {e}") from None

    return map_policies(policy, convert)


__all__ = ["slot_policy"]
