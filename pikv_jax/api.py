"""High-level API in the spirit of PiKV's `PiKVEnhancedModel`: load, generate, read measured stats.

    model = PiKVModel.from_pretrained("smollm2")
    out = model.generate(["The capital of France is"], max_new_tokens=16)
    print(out.texts[0], model.get_stats())
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pikv_jax.cache.policies.base import CachePolicy, init_policy_cache, map_policies
from pikv_jax.cache.policies.expected_attention import ExpectedAttention
from pikv_jax.cache.policies.expert_kv import ExpertKV
from pikv_jax.cache.policies.kvzip import (
    REPEAT_INSTRUCTION,
    context_scorer,
    with_layer_fractions,
    with_repeat_prompt,
)
from pikv_jax.cache.state import full_bf16_bytes
from pikv_jax.config import ModelConfig
from pikv_jax.intmath import round_up
from pikv_jax.models.llama import CausalLM
from pikv_jax.models.moe_llama import shard_moe_layers
from pikv_jax.models.registry import load_pretrained
from pikv_jax.models.tokenizer import Tokenizer
from pikv_jax.models.weights import random_model
from pikv_jax.runtime import capture, forward
from pikv_jax.runtime import sharding as mesh_sharding
from pikv_jax.runtime.generate import FINISH_REASONS, GenerationLoop, pad_prompts
from pikv_jax.sampling import SamplingConfig

log = logging.getLogger("pikv_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PROMPT_BUCKET = 64  # smallest padded prompt width
SUFFIX_BUCKET = 8  # smallest padded width of suffixes and teacher-forced continuations


def bucket_length(n: int, minimum: int = PROMPT_BUCKET) -> int:
    """Smallest width >= n among minimum * 2^k and minimum * 3 * 2^k (64, 128, 192, 256, 384, 512,
    768, ...): two programs per octave, at most 50% padding, and the multiples of 64 up to 256
    unchanged. Rows are ragged (per-row lengths), so padding changes shapes, not results."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    size = minimum
    while True:
        if n <= size:
            return size
        if size >= 2 * minimum and n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def parse_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


@dataclasses.dataclass
class GenerationOutput:
    texts: list[str]
    token_ids: list[list[int]]  # generated ids per prompt (stop token included when hit)
    finish_reasons: list[str]
    prompt_lengths: list[int]
    stats: dict


class PiKVModel:
    """A Llama-family model plus tokenizer, generating through jitted prefill + decode loops.

    mesh: optional `jax.sharding.Mesh` with axes among data / model / expert (see
    pikv_jax/runtime/sharding.py): the parameters are placed on it under the sharding rules and
    `generate` runs sharded, with the same greedy tokens as on one device. None: one device.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: ModelConfig, *,
                 cache_dtype=None, policy: CachePolicy | None = None, name: str = "model", mesh: Mesh | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.mesh = mesh
        if mesh is not None:  # MoE blocks run their experts where the rules place them (static: before split)
            shard_moe_layers(model, mesh)
        self.graphdef, self.params = nnx.split(model)
        if mesh is not None:  # the module then holds the placed arrays too (no second full copy)
            self.params = mesh_sharding.place_params(self.params, config, mesh)
            nnx.update(self.model, self.params)
        self.cache_dtype = parse_dtype(cache_dtype) if cache_dtype is not None else model.dtype
        self.policy = policy if policy is not None else CachePolicy()
        self._compiled: collections.OrderedDict = collections.OrderedDict()  # LRU of compiled programs
        self._stats: dict = {}
        self._calibrated: dict = {}  # calibration results per setting (KVzip's global layer shares)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2", *, dtype="float32", cache_dtype=None,
                        policy: CachePolicy | None = None, seed: int = 0, progress=None,
                        mesh: Mesh | None = None) -> "PiKVModel":
        """Bundled name ("smollm2"), GGUF file, Hugging Face folder, or "random:<preset>"; `mesh`
        places the parameters for sharded generation (see the class docstring)."""
        model, tok, cfg = load_pretrained(name_or_path, dtype=parse_dtype(dtype), seed=seed, progress=progress)
        return cls(model, tok, cfg, cache_dtype=cache_dtype, policy=policy, name=name_or_path, mesh=mesh)

    @classmethod
    def from_config(cls, config: ModelConfig, *, seed: int = 0, dtype="float32", **kw) -> "PiKVModel":
        return cls(random_model(config, seed=seed, dtype=parse_dtype(dtype)), None, config, **kw)

    # ------------------------------------------------------------------ prompts

    def encode(self, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token id lists instead of text")
        if not isinstance(text, str) or not text:
            raise ValueError("prompt is empty: pass a non-empty string")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def stop_ids(self) -> tuple[int, ...]:
        ids = {self.config.eos_token_id}
        if self.tokenizer is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(i for i in ids if i is not None))

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 chat: bool = False, system: str | None = None, policy: CachePolicy | None = None,
                 max_cache_tokens: int | None = None, stop_ids: Sequence[int] | None = None,
                 callback: Callable | None = None, suffixes: Sequence | None = None) -> GenerationOutput:
        """Generates for a batch of prompts (text or token ids) of different lengths.

        max_cache_tokens: optional cap on cache slots per layer; a prompt that does not fit raises.
        callback(step, tokens i32[B], emitted bool[B]) streams each step's tokens to the host.
        suffixes: per prompt, text or ids fed after the prompt was compressed by the policy and
          before generation (query-agnostic evaluation: compress the context, then ask).
        With a mesh, a batch that the `data` axis does not divide is padded with copies of the last
        prompt (throwaway rows, dropped from the output, the stats and the callback).
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
        policy = self.bind_policy(policy)
        ids = self._prompt_ids(prompts, chat=chat, system=system)
        run_ids, suffixes, callback = self._mesh_rows(ids, suffixes, callback)
        tokens, lengths = self.pad_prompt_batch(run_ids)
        longest = int(lengths.max())
        if max_cache_tokens is not None and longest > max_cache_tokens:
            raise ValueError(f"prompt of {longest} tokens is longer than the cache capacity "
                             f"max_cache_tokens={max_cache_tokens}")
        if max_cache_tokens is not None and tokens.shape[1] > max_cache_tokens:
            tokens = tokens[:, :max_cache_tokens]  # only padding goes; else the cap below would be the padded length
        if longest + max_new_tokens > self.config.max_position_embeddings:
            log.warning("prompt (%d) + max_new_tokens (%d) exceeds the model's max_position_embeddings (%d)",
                        longest, max_new_tokens, self.config.max_position_embeddings)
        suffix, suffix_lengths = self._suffix_ids(suffixes, len(run_ids))
        extra = 0 if suffix is None else suffix.shape[1]
        caps = tuple(policy.capacity_for(i, tokens.shape[1], max_new_tokens + extra)
                     for i in range(self.config.num_hidden_layers))
        if max_cache_tokens is not None:
            caps = tuple(min(c, max(max_cache_tokens, tokens.shape[1])) for c in caps)
        caps = mesh_sharding.seq_capacities(caps, policy.evicts, self.mesh)  # a `seq` axis needs multiples of it
        loop = GenerationLoop(graphdef=self.graphdef, policy=policy, sampling=sampling,
                              max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids) if stop_ids is not None
                              else self.stop_ids(), callback=callback)
        make_cache = functools.partial(init_policy_cache, policy, len(run_ids), caps, dtype=self.cache_dtype,
                                       num_kv_heads=self.config.num_key_value_heads, head_dim=self.config.dim_per_head)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        key = jax.random.key(seed)
        cache = jax.eval_shape(make_cache)
        if self.mesh is not None:
            tokens, lengths, key, suffix, suffix_lengths = self._place_inputs(tokens, lengths, key, suffix,
                                                                              suffix_lengths)
            mesh_sharding.check_expert_axis(cache, self.config, self.mesh)
            cache = mesh_sharding.with_shardings(cache, mesh_sharding.cache_shardings(cache, self.mesh))
        (prefill_fn, decode_fn, init_fn, resident_fn), compile_s = self._program(
            loop, tokens, lengths, cache, key, suffix, suffix_lengths, make_cache=make_cache)
        cache = init_fn()

        t0 = time.perf_counter()
        state = prefill_fn(self.params, tokens, lengths, cache, key, suffix, suffix_lengths)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        state = decode_fn(self.params, state)
        jax.block_until_ready(state)
        t2 = time.perf_counter()
        return self._finish(state, ids, t1 - t0, t2 - t1, compile_s, policy, resident=resident_fn(state.cache))

    def _mesh_rows(self, ids: list[list[int]], suffixes, callback):
        """(ids, suffixes, callback) padded to a multiple of the mesh's `data` axis with copies of the
        last row (they finish with it under greedy decoding, so the loop runs no longer); the
        callback then sees only the real rows. Unchanged without a mesh or when the axis divides."""
        rows = mesh_sharding.padded_batch(len(ids), self.mesh)
        if rows == len(ids):
            return ids, suffixes, callback
        extra = rows - len(ids)
        if suffixes is not None:
            if len(suffixes) != len(ids):
                raise ValueError(f"suffixes has {len(suffixes)} entries, expected one per prompt ({len(ids)})")
            suffixes = list(suffixes) + [suffixes[-1]] * extra
        if callback is not None:
            callback = _RealRows(callback, len(ids))
        return ids + [ids[-1]] * extra, suffixes, callback

    def _place_inputs(self, *arrays):
        """Per-row arrays over the mesh's `data` axis, scalars and keys replicated (None passes); on
        a mesh over several processes each process fills its own shards (`runtime.sharding.put`)."""
        out = []
        for x in arrays:
            if x is not None:
                ndim = getattr(x, "ndim", 0)
                per_row = ndim and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                sharding = (mesh_sharding.batch_sharding(self.mesh, ndim) if per_row
                            else mesh_sharding.replicated(self.mesh))
                x = mesh_sharding.put(x, sharding)
            out.append(x)
        return out

    def _prompt_ids(self, prompts, *, chat, system) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.encode(p, chat=chat, system=system))
            else:
                p = [int(t) for t in p]
                if not p:
                    raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
                bad = [t for t in p if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}")
                out.append(p)
        return out

    def prompt_width(self, ids: list[list[int]]) -> int:
        """Padded prompt width: `bucket_length` of the longest prompt, capped at the model's context
        (rounded up to a multiple of 64) so a bucket never pads far past what the model can read."""
        longest = max(len(p) for p in ids)
        cap = round_up(max(longest, self.config.max_position_embeddings), PROMPT_BUCKET)
        return min(bucket_length(longest), cap)

    def pad_prompt_batch(self, ids: list[list[int]]):
        """(tokens i32[B, S], lengths i32[B]) host arrays: the prompts right-padded to `prompt_width`
        with the end-of-sequence id (what `generate` feeds its prefill)."""
        pad = self.tokenizer.eos_token_id if self.tokenizer and self.tokenizer.eos_token_id is not None else 0
        return pad_prompts(ids, pad_id=pad, multiple=self.prompt_width(ids))

    def _suffix_ids(self, suffixes, batch: int):
        if suffixes is None:
            return None, None
        if len(suffixes) != batch:
            raise ValueError(f"suffixes has {len(suffixes)} entries, expected one per prompt ({batch})")
        ids = [self.encode(x) if isinstance(x, str) else [int(t) for t in x] for x in suffixes]
        width = bucket_length(max(1, max(len(x) for x in ids)), SUFFIX_BUCKET)
        out = np.zeros((batch, width), np.int32)
        for i, x in enumerate(ids):
            out[i, : len(x)] = x
        return jnp.asarray(out), jnp.asarray([len(x) for x in ids], jnp.int32)

    def _compile(self, loop: GenerationLoop, tokens, lengths, cache, key, suffix=None, suffix_lengths=None):
        """AOT-compiles prefill and decode once per (loop, shapes); returns their executables and the
        compile seconds (0.0 when they were already compiled)."""
        (prefill, decode, _, _), compile_s = self._program(loop, tokens, lengths, cache, key, suffix, suffix_lengths)
        return prefill, decode, compile_s

    def _program(self, loop: GenerationLoop, tokens, lengths, cache, key, suffix=None, suffix_lengths=None, *,
                 make_cache: Callable | None = None):
        """-> ((prefill, decode, init_cache, resident), compile_s): the executables of one program,
        compiled once per (loop, shapes) and kept in the LRU. `cache` may be abstract (eval_shape).
        init_cache() -> a fresh empty cache; resident(cache) -> i32[L, B, Hkv] resident tokens.
        Compiling these two as well keeps eager ops on per-shape arrays (which jax would cache
        forever) out of `generate`."""
        sig = (loop, tokens.shape, tuple(cache.capacities()), cache.batch,
               None if suffix is None else suffix.shape)
        if sig in self._compiled:
            self._compiled.move_to_end(sig)
            entry = self._compiled[sig]
            if make_cache is None or entry[2] is not None:
                return entry, 0.0
        t0 = time.perf_counter()
        entry = compile_generation(loop, self.params, tokens, lengths, cache, key, suffix, suffix_lengths,
                                   make_cache=make_cache, mesh=self.mesh)
        compile_s = time.perf_counter() - t0
        self._remember(sig, entry)
        return entry, compile_s

    # Programs kept per model. Each holds its JIT-compiled code until dropped (SmolLM2 on CPU: ~1,300
    # memory maps and ~140 MB per program; vm.max_map_count is 65,530 by default).
    MAX_COMPILED = 16

    def _remember(self, key, value) -> None:
        """Keeps the `MAX_COMPILED` most recently used compiled programs, so a long-lived model that
        sees many shapes or policies does not hold every executable forever."""
        self._compiled[key] = value
        self._compiled.move_to_end(key)
        while len(self._compiled) > self.MAX_COMPILED:
            self._compiled.popitem(last=False)

    def _finish(self, state, ids, prefill_s, decode_s, compile_s, policy, *, resident=None) -> GenerationOutput:
        rows = len(ids)  # real rows: a mesh may have padded the batch with throwaway rows after them
        host = mesh_sharding.to_host  # gathers arrays spread over several processes (every process calls it)
        n = host(state.num_generated)[:rows]
        toks = host(state.tokens)
        finish = host(state.finish)[:rows]
        token_ids = [toks[i, : n[i]].tolist() for i in range(rows)]
        texts = [self.tokenizer.decode(t) if self.tokenizer else "" for t in token_ids]
        cache = state.cache
        cfg = self.config
        lengths = host(cache.length)[:rows]
        resident = cache.resident_tokens() if resident is None else host(resident)  # [L, B, Hkv]
        resident = resident[:, :rows]
        slots = sum(layer.slots_per_row for layer in cache.layers) * len(ids)
        decode_steps = int(state.step)
        stats = dict(
            policy=policy.label,
            batch=len(ids),
            prompt_tokens=int(sum(len(p) for p in ids)),
            generated_tokens=int(n.sum()),
            prefill_s=prefill_s,
            prefill_tokens_per_s=sum(len(p) for p in ids) / prefill_s,
            decode_steps=decode_steps,
            decode_s=decode_s,
            decode_ms_per_token=1000.0 * decode_s / decode_steps if decode_steps else float("nan"),
            decode_tokens_per_s=float(n.sum() - len(ids)) / decode_s if decode_steps else float("nan"),
            compile_s=compile_s,
            cache_bytes=cache.nbytes(),
            cache_bytes_per_device=mesh_sharding.bytes_per_device(cache),
            full_cache_bytes=full_bf16_bytes(lengths, num_layers=cfg.num_hidden_layers,
                                             num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head),
            cache_capacity_tokens=int(max(cache.capacities())),
            kept_tokens=float(resident.mean(axis=(0, 2)).sum()),  # resident per row, averaged over layers/heads
            seen_tokens=int(lengths.sum()),
            cache_fill=float(resident.sum() / slots),
        )
        if self.mesh is not None:
            stats["mesh"] = mesh_sharding.mesh_summary(self.mesh)
        if hasattr(policy, "generation_stats"):  # a policy's own measurements (expert_kv: shard loads, bytes read)
            stats.update(policy.generation_stats(cache, rows, to_host=host))
        self._stats = stats
        return GenerationOutput(texts=texts, token_ids=token_ids,
                                finish_reasons=[FINISH_REASONS[int(f)] for f in finish],
                                prompt_lengths=[len(p) for p in ids], stats=stats)

    def bind_policy(self, policy: CachePolicy | None) -> CachePolicy:
        """The given policy or the model's default, bound to this model: KVzip's repeat instruction
        encoded by its tokenizer when a KVzip inside has none (no tokenizer: the repeat input is the
        bare context), the query-head count a decode-evicting Expected Attention needs, and on a mesh
        with an `expert` axis, expert_kv's device-local routed read (`read=mask`); expert_kv(router=moe)
        gets the model's expert count."""
        policy = self.policy if policy is None else policy
        heads = self.config.num_attention_heads
        policy = map_policies(policy, lambda p: dataclasses.replace(p, num_query_heads=heads)
                              if isinstance(p, ExpectedAttention) and p.decode_evict and not p.num_query_heads else p)
        experts = self.config.num_experts or None  # expert_kv(router=moe) groups the model's experts into shards
        policy = map_policies(policy, lambda p: dataclasses.replace(p, num_experts=experts)
                              if isinstance(p, ExpertKV) and p.router == "moe" and p.num_experts is None else p)
        if mesh_sharding.axis_size(self.mesh, "expert") > 1:  # its slot axis is split over `expert`
            policy = map_policies(policy, lambda p: dataclasses.replace(p, read="mask")
                                  if isinstance(p, ExpertKV) and p.top_k is not None else p)
        kvzip = context_scorer(policy)
        if kvzip is not None and not kvzip.repeat_prompt_ids and self.tokenizer is not None:
            policy = with_repeat_prompt(policy, self.tokenizer.encode(REPEAT_INSTRUCTION, add_bos=False))
            kvzip = context_scorer(policy)
        if kvzip is not None and kvzip.budget_scope == "global" and not kvzip.layer_fractions:
            policy = with_layer_fractions(policy, self._kvzip_fractions(policy, kvzip))
        return policy

    def _kvzip_fractions(self, policy: CachePolicy, kvzip) -> tuple[float, ...]:
        """Calibrated layer shares of a global KVzip budget (runtime.capture), once per setting."""
        if policy.budget_ratio is None:
            raise ValueError(f"kvzip(budget_scope=global) needs a ratio budget on {policy.label!r} (e.g. @0.25); "
                             "budget_tokens has no ratio to calibrate")
        key = ("kvzip_fractions", kvzip.repeat_prompt_ids, kvzip.chunk_size, policy.budget_ratio, policy.n_sink,
               policy.window)
        if key not in self._calibrated:
            self._calibrated[key] = capture.kvzip_layer_fractions(self, kvzip, policy.budget_ratio,
                                                                  n_sink=policy.n_sink, window=policy.window)
        return self._calibrated[key]

    def teacher_forced(self, prompts, continuations, *, policy: CachePolicy | None = None,
                       full_logprobs: bool = False):
        """Scores `continuations` given each prompt compressed by `policy` (teacher forcing; the
        continuation goes through the decode path, so decode-time eviction applies).

        Returns (logprobs, lengths): f32[B, T] log-probability of each continuation token (or the
        full log-softmax f32[B, T, V] before each continuation token with `full_logprobs`), and the
        continuation lengths i32[B]. Position t of row b is valid for t < lengths[b].
        """
        policy = self.bind_policy(policy)
        ids = self._prompt_ids(prompts, chat=False, system=None)
        conts = [self.encode(c) if isinstance(c, str) else [int(t) for t in c] for c in continuations]
        if len(conts) != len(ids):
            raise ValueError(f"continuations has {len(conts)} entries, expected one per prompt ({len(ids)})")
        if any(len(c) == 0 for c in conts):
            raise ValueError("every continuation needs at least one token")
        tokens, lengths = pad_prompts(ids, multiple=self.prompt_width(ids))
        longest_cont = max(len(c) for c in conts)
        width = bucket_length(longest_cont, SUFFIX_BUCKET)  # bounded shapes; padded steps are inactive
        # feed: last prompt token's successor is cont[0]; the fed sequence is cont[:-1] scored against cont[1:],
        # and cont[0] is scored from the prompt's own logits.
        fed = np.zeros((len(ids), width), np.int32)
        tgt = np.zeros((len(ids), width), np.int32)
        for i, c in enumerate(conts):
            fed[i, : len(c)] = c
            tgt[i, : len(c) - 1] = c[1:]
        caps = tuple(policy.capacity_for(i, tokens.shape[1], width) for i in range(self.config.num_hidden_layers))
        cache = init_policy_cache(policy, len(ids), caps, num_kv_heads=self.config.num_key_value_heads,
                                  head_dim=self.config.dim_per_head, dtype=self.cache_dtype)
        fn = self._teacher_forced_fn(policy, full_logprobs)
        out = fn(self.params, jnp.asarray(tokens), jnp.asarray(lengths), cache, jnp.asarray(fed),
                 jnp.asarray(tgt), jnp.asarray([len(c) for c in conts], jnp.int32))
        return np.asarray(out)[:, :longest_cont], np.array([len(c) for c in conts], np.int32)

    def capture_qkv(self, prompts=None, *, max_tokens: int = 512):
        """Every layer's post-RoPE queries, keys and values of a prefill over `prompts` (token id
        lists; default: the calibration text): what SVD / LoRA / PiKVCompressor calibrate on."""
        return capture.capture_qkv(self, prompts, max_tokens=max_tokens)

    def _teacher_forced_fn(self, policy: CachePolicy, full_logprobs: bool):
        key = ("teacher_forced", policy, full_logprobs)
        if key not in self._compiled:
            graphdef = self.graphdef

            def fn(params, tokens, lengths, cache, fed, tgt, cont_lengths):
                model = nnx.merge(graphdef, params)
                first_logits, cache = forward.prefill(model, tokens, lengths, cache, policy)
                first = jax.nn.log_softmax(first_logits, axis=-1)
                # feed cont[:-1]; step t predicts cont[t + 1]
                _, per_step, _ = forward.extend(model, cache, fed, cont_lengths - 1, policy, targets=tgt,
                                                full_logprobs=full_logprobs)
                if full_logprobs:
                    return jnp.concatenate([first[:, None], per_step[:, :-1]], axis=1)
                lp0 = jnp.take_along_axis(first, fed[:, :1], axis=-1)
                return jnp.concatenate([lp0, per_step[:, :-1]], axis=1)

            self._remember(key, jax.jit(fn))
        else:
            self._compiled.move_to_end(key)
        return self._compiled[key]

    def get_stats(self) -> dict:
        """Measured numbers of the last `generate` call (empty before the first)."""
        return dict(self._stats)


@dataclasses.dataclass(frozen=True)
class _RealRows:
    """A streaming callback that sees only the first `rows` rows (the real ones of a padded batch);
    a dataclass so that equal wrappers give equal `GenerationLoop`s and reuse compiled programs."""

    callback: Callable
    rows: int

    def __call__(self, step, tokens, emitted):
        return self.callback(step, tokens[: self.rows], emitted[: self.rows])


def generation_functions(loop: GenerationLoop, mesh: Mesh | None = None):
    """(prefill, decode): `loop`'s programs as fresh functions to jit, prefill(params, tokens,
    lengths, cache, key, suffix, suffix_lengths) -> DecodeState and decode(params, state) ->
    DecodeState. With a mesh both pin the loop state's shardings on their output
    (`runtime.sharding.state_shardings`), so the donated cache stays in place from one to the next."""
    prefill_impl = GenerationLoop.prefill.__wrapped__
    decode_impl = GenerationLoop.decode.__wrapped__

    def placed(state):
        return state if mesh is None else jax.lax.with_sharding_constraint(
            state, mesh_sharding.state_shardings(state, mesh))

    def prefill(params, tokens, lengths, cache, key, suffix, suffix_lengths):
        return placed(prefill_impl(loop, params, tokens, lengths, cache, key, suffix, suffix_lengths))

    def decode(params, state):
        return placed(decode_impl(loop, params, state))

    return prefill, decode


def compile_generation(loop: GenerationLoop, params, tokens, lengths, cache, key, suffix=None, suffix_lengths=None,
                       *, make_cache: Callable | None = None, mesh: Mesh | None = None):
    """AOT-compiles `loop`'s prefill and decode for these shapes (`cache` concrete or abstract) ->
    (prefill, decode, init_cache, resident) executables; the last two, compiled only with
    `make_cache` (a function of no arguments returning the empty cache), are None without it.

    mesh: the inputs carry shardings on it (params, per-row inputs, the cache); the programs pin
    the loop state's shardings on their outputs (see `generation_functions`) and the cache's on the
    empty cache.

    Each program is jitted from a fresh function object that closes over `loop`, so none of jax's
    caches keyed on the function (traced jaxprs, lowered modules, `_cached_compilation`'s
    executables) outlives the returned executables: dropping them releases the compiled code and
    its memory maps. Jitting `GenerationLoop.prefill` itself would key those caches on the class's
    function, which lives forever, so every program ever compiled would stay resident.
    """
    prefill, decode = generation_functions(loop, mesh)

    def init_cache():
        cache = make_cache()
        return cache if mesh is None else jax.lax.with_sharding_constraint(
            cache, mesh_sharding.cache_shardings(cache, mesh))

    def resident(cache):
        return jnp.stack([layer.resident_per_head() for layer in cache.layers])

    lowered = jax.jit(prefill, donate_argnums=3).lower(params, tokens, lengths, cache, key, suffix, suffix_lengths)
    state = lowered.out_info
    if mesh is not None:  # decode's input: what prefill returns, placed as prefill pins it
        state = mesh_sharding.with_shardings(state, mesh_sharding.state_shardings(state, mesh))
    decode_exe = jax.jit(decode, donate_argnums=1).lower(params, state).compile()
    init_exe = resident_exe = None
    if make_cache is not None:
        init_exe = jax.jit(init_cache).lower().compile()
        resident_exe = jax.jit(resident).lower(state.cache).compile()
    return lowered.compile(), decode_exe, init_exe, resident_exe
