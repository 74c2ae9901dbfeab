"""Decode speed by the timing protocol of `pikv_jax.bench` (warm-up, interleaved rounds, median and
min-max, ratios from the same run), shared by the `speed` task of `pikv eval` and the decode
benchmark scripts.

What is timed is the compiled decode loop of `PiKVModel.generate` (the same executables: a while
loop over decode steps, stop tokens off) run from a copy of the prefilled state; the value is wall
seconds of that call over its number of decode steps (`new_tokens - 1`: prefill emits the first
token). Compilation, prefill and the copy of the state are outside the timer, as they are outside
`generate`'s own `decode_ms_per_token`.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.bench import interleaved_rounds, protocol, spread
from pikv_jax.cache.policies.base import CachePolicy, init_policy_cache
from pikv_jax.config import tiny_config
from pikv_jax.eval import passkey
from pikv_jax.runtime.generate import GenerationLoop
from pikv_jax.sampling import SamplingConfig

TINY = "tiny"  # a 2-layer random model (head dim 64) for the quick modes of the scripts: no download, fast compiles


def load_bench_model(name: str, *, dtype: str = "float32", cache_dtype=None) -> PiKVModel:
    """`PiKVModel.from_pretrained(name)`, or a tiny random model for `name == "tiny"`."""
    if name == TINY:
        return PiKVModel.from_config(tiny_config(vocab_size=512, hidden_size=256, num_attention_heads=4,
                                                 max_position_embeddings=4096), dtype=dtype,
                                     cache_dtype=cache_dtype)
    return PiKVModel.from_pretrained(name, dtype=dtype, cache_dtype=cache_dtype)


def random_prompt(model: PiKVModel, length: int, rng: np.random.Generator) -> list[int]:
    """`length` random token ids above the special tokens (below 100 on real vocabularies)."""
    low = 100 if model.config.vocab_size > 1000 else 3
    return rng.integers(low, model.config.vocab_size, length).tolist()


def varied_prompt(model: PiKVModel, context: int, *, codec=None) -> list[int]:
    """`context` token ids of the shipped varied haystack (repeated as needed): the timing prompt."""
    hay = passkey.make_haystack(codec or passkey.codec_for(model), "varied")
    return [hay.ids[i % len(hay.ids)] for i in range(context)]


class DecodeProgram:
    """The prefill and decode executables `generate` compiles for (policy, prompts, new_tokens),
    with greedy sampling and stop tokens off, and one prefilled state to decode from.

    `decode_ms()` -> ms per decode step of one run of the loop from a copy of that state;
    `prefill_s()` -> seconds of one prefill from a fresh cache (allocated outside the timer)."""

    def __init__(self, model: PiKVModel, policy: CachePolicy, prompts: Sequence[Sequence[int]], new_tokens: int,
                 *, clock: Callable[[], float] = time.perf_counter):
        cfg = model.config
        policy = model.bind_policy(policy)  # as generate binds it (KVzip's instruction and layer shares, ...)
        self.model, self.policy, self.clock = model, policy, clock
        ids = [list(p) for p in prompts]
        tokens, lengths = model.pad_prompt_batch(ids)  # what generate feeds
        self.tokens, self.lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        self.prompt_tokens = int(lengths.sum())
        # equal to the loop `generate` builds, so `model._compile` returns the executables it compiled
        self.loop = GenerationLoop(graphdef=model.graphdef, policy=policy,
                                   sampling=SamplingConfig(temperature=0.0, top_k=0, top_p=1.0),
                                   max_new_tokens=new_tokens, stop_ids=())
        self.caps = tuple(policy.capacity_for(i, tokens.shape[1], new_tokens) for i in range(cfg.num_hidden_layers))
        self.key = jax.random.key(0)
        self.ids = ids
        self.prefill_fn, self.decode_fn, self.compile_s = model._compile(self.loop, self.tokens, self.lengths,
                                                                         self._fresh_cache(), self.key)
        cache = jax.block_until_ready(self._fresh_cache())
        t0 = clock()
        self.state = jax.block_until_ready(self._prefill(cache))
        self.first_prefill_s = clock() - t0
        self.cache_bytes = self.state.cache.nbytes()

    def run_once(self):
        """One decode run from the prefilled state, reported as `generate` reports it (a
        GenerationOutput with its stats: the first decode run of the executables when nothing ran
        them before, compile and prefill seconds of this program)."""
        fresh = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, self.state))
        t0 = self.clock()
        out = jax.block_until_ready(self.decode_fn(self.model.params, fresh))
        decode_s = self.clock() - t0
        return self.model._finish(out, self.ids, self.first_prefill_s, decode_s, self.compile_s, self.policy)

    def _fresh_cache(self):
        cfg = self.model.config
        return init_policy_cache(self.policy, self.tokens.shape[0], self.caps, num_kv_heads=cfg.num_key_value_heads,
                                 head_dim=cfg.dim_per_head, dtype=self.model.cache_dtype)

    def _prefill(self, cache):
        return self.prefill_fn(self.model.params, self.tokens, self.lengths, cache, self.key, None, None)

    def prefill_s(self) -> float:
        cache = jax.block_until_ready(self._fresh_cache())  # prefill donates it
        t0 = self.clock()
        jax.block_until_ready(self._prefill(cache))
        return self.clock() - t0

    def decode_ms(self) -> float:
        fresh = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, self.state))  # decode donates its input
        t0 = self.clock()
        out = jax.block_until_ready(self.decode_fn(self.model.params, fresh))
        return 1000 * (self.clock() - t0) / max(int(out.step), 1)


def decode_rounds(programs: dict[str, DecodeProgram], *, rounds: int, warmup: int = 1, log: bool = True):
    """Interleaved rounds of `decode_ms` over `programs` (a bench.Rounds, values in ms/step)."""
    def show(r, vals):
        if log:
            print(f"  round {r}: " + " | ".join(f"{n} {v:.1f}" for n, v in vals.items()) + " ms/step", flush=True)

    return interleaved_rounds({n: p.decode_ms for n, p in programs.items()}, rounds=rounds, warmup=warmup,
                              self_timed=True, on_round=show)


def timing_fields(prefix: str, s: dict, warm: Sequence[float] = ()) -> dict:
    """Flat JSON fields of one spread: prefix (median), prefix_min, prefix_max, prefix_rounds[, _warmup]."""
    out = {prefix: s["median"], f"{prefix}_min": s["min"], f"{prefix}_max": s["max"], f"{prefix}_rounds": s["rounds"]}
    if warm:
        out[f"{prefix}_warmup"] = list(warm)
    return out


def ratio_fields(prefix: str, r: dict | None) -> dict:
    """prefix (ratio of medians), prefix_min / _max (range) and prefix_range_from; None without a base."""
    if r is None:
        return {prefix: None, f"{prefix}_min": None, f"{prefix}_max": None}
    return {prefix: r["median"], f"{prefix}_min": r["min"], f"{prefix}_max": r["max"],
            f"{prefix}_range_from": r["range_from"]}


def decode_speed(model, methods, *, context: int, batches: Sequence[int], new_tokens: int, rounds: int = 5,
                 codec=None, progress=None, ckpt=None, on_error: Callable | None = None,
                 log: bool = False) -> list[dict]:
    """Decode ms/token with a `context`-token prompt of varied text, stop tokens disabled, per
    method and batch: per method, the executables `generate` uses are compiled and run once as
    `generate` runs them (its stats; that first, cold decode time is kept as
    `cold_generate_decode_ms_per_token`), then a warm-up round and `rounds` interleaved rounds of the
    same compiled decode loop over all methods of the batch. decode_ms_per_token is the median (with
    _min, _max, _rounds); ratio_vs_full the ratio of medians against the full cache of the same batch,
    its range from the per-round ratios. Bytes are per batch (all rows).

    ckpt: get/put of finished (context, batch) groups; on_error(method, exc, **where) records a
    method's failure and goes on (without it the error is raised)."""
    prompt = varied_prompt(model, context, codec=codec)
    ordered = sorted(methods, key=lambda m: not m.is_full)
    rows = []
    for b in batches:
        key = ["speed-rounds", context, b, new_tokens, rounds, [m.label for m in ordered]]
        group = ckpt.get(key) if ckpt is not None else None
        if group is None:
            group = _speed_group(model, ordered, [prompt] * b, context=context, batch=b, new_tokens=new_tokens,
                                 rounds=rounds, on_error=on_error, log=log)
            if ckpt is not None:
                ckpt.put(key, group)
        for r in group:
            if progress:
                progress(f"speed {r['method']} b{b}")
        rows += group
    return rows


def _speed_group(model, methods, prompts, *, context, batch, new_tokens, rounds, on_error, log) -> list[dict]:
    stats, programs = {}, {}
    for m in methods:
        try:
            programs[m.label] = DecodeProgram(model, m.policy, prompts, new_tokens)
            stats[m.label] = programs[m.label].run_once().stats
        except Exception as e:
            if on_error is None:
                raise
            on_error(m.label, e, batch=batch, context=context)
    if not programs:
        return []
    res = decode_rounds(programs, rounds=rounds, log=log)
    full = next((m.label for m in methods if m.is_full and m.label in programs), None)
    group = []
    for label, prog in programs.items():
        st = stats[label]
        group.append(dict(method=label, context=context, batch=batch, new_tokens=new_tokens,
                          **timing_fields("decode_ms_per_token", spread(res.values[label]), res.warmup[label]),
                          **ratio_fields("ratio_vs_full", res.ratio(label, full) if full else None),
                          cold_generate_decode_ms_per_token=st["decode_ms_per_token"],
                          prefill_tokens_per_s=st["prefill_tokens_per_s"], prefill_timed="once",
                          cache_bytes=st["cache_bytes"], full_cache_bytes=st["full_cache_bytes"],
                          kept_bytes=passkey.kept_bytes_per_row(st, model.config) * batch, compile_s=st["compile_s"],
                          protocol=protocol(rounds, 1)))
    return group


__all__ = ["DecodeProgram", "decode_rounds", "decode_speed", "load_bench_model", "random_prompt", "ratio_fields",
           "timing_fields", "varied_prompt"]
