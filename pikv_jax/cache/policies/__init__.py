"""Cache policies: pure functions on the cache pytree, one file per method. `make_policy` builds
one by name; every policy's parameters are documented on its class."""

from __future__ import annotations

import dataclasses

from pikv_jax.cache.policies.adakv import AdaKV
from pikv_jax.cache.policies.base import CachePolicy, FullCache, PrefillContext, init_policy_cache
from pikv_jax.cache.policies.composite import Composite
from pikv_jax.cache.policies.duo_attention import DuoAttention
from pikv_jax.cache.policies.expected_attention import ExpectedAttention
from pikv_jax.cache.policies.expert_kv import ExpertKV
from pikv_jax.cache.policies.h2o import H2O
from pikv_jax.cache.policies.knorm import KeyDiff, Knorm
from pikv_jax.cache.policies.kvzip import KVzip
from pikv_jax.cache.policies.lru import LRU
from pikv_jax.cache.policies.quest import Quest
from pikv_jax.cache.policies.snapkv import PyramidKV, SnapKV
from pikv_jax.cache.policies.streaming_llm import StreamingLLM
from pikv_jax.cache.policies.tova import TOVA

POLICIES: dict[str, type[CachePolicy]] = {
    "full": CachePolicy,
    "streaming_llm": StreamingLLM,
    "h2o": H2O,
    "lru": LRU,
    "tova": TOVA,
    "knorm": Knorm,
    "keydiff": KeyDiff,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "expected_attention": ExpectedAttention,
    "kvzip": KVzip,
    "duo_attention": DuoAttention,
    "quest": Quest,
    "expert_kv": ExpertKV,
}
ALIASES = {"none": "full", "streamingllm": "streaming_llm", "streaming": "streaming_llm"}


def register_policy(name: str, cls: type[CachePolicy]) -> None:
    POLICIES[name] = cls


def policy_class(name: str) -> type[CachePolicy]:
    key = ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {sorted(POLICIES)}")
    return POLICIES[key]


def make_policy(name: str, *, num_layers: int | None = None, **options) -> CachePolicy:
    """A policy by name. Options not accepted by that policy raise, naming the allowed ones.
    `num_layers` is passed to policies that spread budgets over depth (PyramidKV). A `scorer` given
    by name (AdaKV's) is built with its own defaults, or with its options when given as (name,
    ((key, value), ...))."""
    cls = policy_class(name)
    scorer = options.get("scorer")
    if isinstance(scorer, str):
        options = {**options, "scorer": make_policy(scorer, num_layers=num_layers)}
    elif isinstance(scorer, tuple):
        options = {**options, "scorer": make_policy(scorer[0], num_layers=num_layers, **dict(scorer[1]))}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if "num_layers" in fields and num_layers is not None:
        options.setdefault("num_layers", num_layers)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"policy {cls.name!r} does not take {unknown}; allowed options: {sorted(fields)}")
    return cls(**options)


__all__ = ["CachePolicy", "Composite", "ExpertKV", "FullCache", "H2O", "KeyDiff", "Knorm", "LRU", "POLICIES",
           "PrefillContext", "PyramidKV", "SnapKV", "StreamingLLM", "TOVA", "init_policy_cache", "make_policy",
           "policy_class", "register_policy"]
