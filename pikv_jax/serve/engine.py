"""Continuous batching over a fixed pool of cache slots (the serving engine).

    engine = Engine(model, policy, max_prompt_tokens=4096, max_new_tokens=256, cache_memory="2GiB")
    handle = engine.submit(Request(prompt=ids, max_new_tokens=64))
    engine.run_until_idle()          # or engine.start() for a background thread
    handle.tokens, handle.finish_reason

Each host visit (`step`) admits queued requests into free slots (a prefill of one request, written
into its slot while the other slots keep their state), then runs `steps_per_visit` decode steps of
every occupied slot in one compiled loop, and hands each request the tokens it produced. A request
leaves its slot on a stop token, at its max_new_tokens, when a non-evicting cache is full, or when
cancelled; the next queued request takes the slot at the following visit. The number of slots
comes from a memory budget and the bytes of one slot under the chosen policy, so a compressed
cache (a 25% budget, int4) serves proportionally more requests at once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import re
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pikv_jax.api import PiKVModel
from pikv_jax.cache.policies.base import CachePolicy
from pikv_jax.cache.state import tree_nbytes
from pikv_jax.runtime.generate import FINISH_REASONS, RUNNING
from pikv_jax.sampling import SamplingConfig
from pikv_jax.serve.budget import slot_policy
from pikv_jax.serve.metrics import EngineMetrics
from pikv_jax.serve.slots import NO_TOKEN, SlotPrograms, cache_layout, empty_pool, row_settings

CANCELLED = "cancelled"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"cache_memory={text!r} is not a size; allowed: a number of bytes or e.g. 512MiB, "
                             "2GiB, 1.5GB")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n < 1:
        raise ValueError(f"cache_memory must be positive, got {text!r}")
    return n


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. stop_ids None = the model's end-of-sequence ids."""

    prompt: Sequence[int]
    max_new_tokens: int = 64
    stop_ids: Sequence[int] | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class RequestHandle:
    """A submitted request: its tokens as they arrive, its finish reason, and timing.

    Iterate it (from any thread) for tokens as they are produced; `on_token(handle, token)` and
    `on_finish(handle)` callbacks run on the engine thread (keep them short)."""

    def __init__(self, rid: int, request: Request, *, on_token: Callable | None = None,
                 on_finish: Callable | None = None):
        self.id = rid
        self.request = request
        self.tokens: list[int] = []
        self.token_times: list[float] = []  # host arrival time of each token (a visit delivers several)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.evicted_tokens = 0.0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._on_token, self._on_finish = on_token, on_finish

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Asks the engine to stop this request; its slot is freed at the next visit."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def __iter__(self):
        while True:
            item = self._events.get()
            if item is None:
                return
            yield item

    # engine side
    def _push(self, token: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.tokens.append(token)
        self.token_times.append(now)
        self._events.put(token)
        if self._on_token:
            self._callback(self._on_token, token)

    def _finish(self, reason: str, now: float, error: str | None = None) -> None:
        self.finish_reason, self.finished_at = reason, now
        self.error = error if error is not None else self.error  # keep a failed callback's reason
        self._events.put(None)
        self._done.set()
        if self._on_finish:
            self._callback(self._on_finish)

    def _callback(self, fn, *args) -> None:
        """Runs a user callback; one that raises cancels its own request, never the engine."""
        try:
            fn(self, *args)
        except Exception as e:  # a caller's bug must not stop the other requests
            self.error = f"callback failed: {type(e).__name__}: {e}"
            self._cancel.set()


class Engine:
    """Continuous batching over `num_slots` cache slots (or as many as `cache_memory` holds).

    policy: a CachePolicy (ratio budgets become token budgets of the slot, see serve.budget), or
    None for the model's own. max_prompt_tokens / max_new_tokens: the largest request the pool is
    sized for; longer ones are refused at submit. steps_per_visit: decode steps between host visits.
    """

    def __init__(self, model: PiKVModel, policy: CachePolicy | None = None, *, max_prompt_tokens: int,
                 max_new_tokens: int, num_slots: int | None = None, cache_memory: str | int | None = None,
                 steps_per_visit: int = 8, max_stop_ids: int = 8, max_queue: int = 4096):
        for name, v, lo in (("max_prompt_tokens", max_prompt_tokens, 1), ("max_new_tokens", max_new_tokens, 1),
                            ("steps_per_visit", steps_per_visit, 1), ("max_stop_ids", max_stop_ids, 1),
                            ("max_queue", max_queue, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if (num_slots is None) == (cache_memory is None):
            raise ValueError("give exactly one of num_slots or cache_memory")
        cfg = model.config
        if max_prompt_tokens + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} exceeds the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings})")
        self.model = model
        self.policy = model.bind_policy(slot_policy(policy if policy is not None else model.policy, max_prompt_tokens))
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.steps_per_visit, self.max_stop_ids, self.max_queue = steps_per_visit, max_stop_ids, max_queue
        width = model.prompt_width([[0] * max_prompt_tokens])
        caps = tuple(self.policy.capacity_for(i, width, max_new_tokens) for i in range(cfg.num_hidden_layers))
        base = SlotPrograms(graphdef=model.graphdef, policy=self.policy, capacities=caps,
                            num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_per_head,
                            cache_dtype=jnp.dtype(model.cache_dtype).name, batched=())
        flags, one, two = cache_layout(base, model.params, 64)
        self.programs = dataclasses.replace(base, batched=flags)
        self.slot_bytes = tree_nbytes(two) - tree_nbytes(one)  # what one more slot allocates
        shared = tree_nbytes(one) - self.slot_bytes
        if num_slots is None:
            budget = parse_bytes(cache_memory)
            num_slots = (budget - shared) // self.slot_bytes
            if num_slots < 1:
                raise ValueError(f"cache_memory={cache_memory!r} holds no slot: one slot of {self.policy.label} for "
                                 f"{max_prompt_tokens}+{max_new_tokens} tokens takes {self.slot_bytes:,} bytes")
        elif not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {num_slots!r}")
        self.num_slots = int(num_slots)
        self.state = empty_pool(one, flags, self.num_slots, max_stop_ids)
        self.cache_bytes_allocated = tree_nbytes(self.state.cache)
        self._slots: list[RequestHandle | None] = [None] * self.num_slots
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._error: str | None = None
        self.metrics = EngineMetrics(num_slots=self.num_slots, slot_bytes=self.slot_bytes,
                                     cache_bytes_allocated=self.cache_bytes_allocated)
        self._entries_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads

    # ------------------------------------------------------------------ requests

    def validate(self, request: Request) -> Request:
        """The request with its prompt as ints, or a ValueError naming the field and what is allowed."""
        prompt = [int(t) for t in request.prompt]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("prompt is empty: a request needs at least one token")
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than this engine's max_prompt_tokens="
                             f"{self.max_prompt_tokens}")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        n = request.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be an integer in [1, {self.max_new_tokens}], got {n!r}")
        SamplingConfig(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        stop = self.model.stop_ids() if request.stop_ids is None else tuple(int(t) for t in request.stop_ids)
        if len(stop) > self.max_stop_ids:
            raise ValueError(f"stop_ids has {len(stop)} ids; at most max_stop_ids={self.max_stop_ids}")
        if any(not 0 <= t < vocab for t in stop):
            raise ValueError(f"stop_ids must be token ids in [0, {vocab}), got {list(stop)}")
        if not isinstance(request.seed, int) or isinstance(request.seed, bool) or not 0 <= request.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2^31), got {request.seed!r}")
        return dataclasses.replace(request, prompt=prompt, stop_ids=stop)

    def submit(self, request: Request, *, on_token: Callable | None = None,
               on_finish: Callable | None = None) -> RequestHandle:
        """Queues a request (thread-safe); raises ValueError for a request the pool cannot serve,
        RuntimeError when the queue is full or the engine is shutting down."""
        request = self.validate(request)
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"the engine stopped after an error and accepts no new request: {self._error}")
            if not self._accepting:
                raise RuntimeError("the engine is shutting down and accepts no new request")
            if len(self._queue) >= self.max_queue:
                raise RuntimeError(f"the request queue is full ({self.max_queue} waiting)")
            handle = RequestHandle(next(self._ids), request, on_token=on_token, on_finish=on_finish)
            self._queue.append(handle)
            self.metrics.submitted(len(self._queue))
            self._lock.notify_all()
        return handle

    # ------------------------------------------------------------------ the loop

    @property
    def busy_slots(self) -> int:
        return sum(h is not None for h in self._slots)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue) or any(h is not None for h in self._slots)

    def step(self) -> None:
        """One host visit: drop cancelled requests, admit queued ones into free slots, run
        `steps_per_visit` decode steps, deliver tokens and free finished slots. One visit at a
        time (the pool's buffers are donated to each program)."""
        with self._step_lock:
            self._visit()

    def _visit(self) -> None:
        for i, h in enumerate(self._slots):
            if h is not None and h._cancel.is_set():
                self.state = self.programs.release(self.state, jnp.int32(i))
                self._free(i, CANCELLED)
        self._admit()
        if not any(h is not None for h in self._slots):
            return
        t0 = time.perf_counter()
        self.state, out, resident = self.programs.decode(self.steps_per_visit, self.model.params, self.state)
        out, finish, resident = jax.device_get((out, self.state.finish, resident))
        now = time.perf_counter()
        lengths = None
        emitted = 0
        for i, h in enumerate(self._slots):
            if h is None:
                continue
            toks = out[:, i]
            for t in toks[toks != NO_TOKEN].tolist():
                h._push(t, now)
                emitted += 1
            if finish[i] != RUNNING:
                if lengths is None:
                    lengths = np.asarray(self.state.cache.length)
                h.evicted_tokens = float(lengths[i] - resident[i] / self._entries_per_token)
                self._free(i, FINISH_REASONS[int(finish[i])])
        self.metrics.visit(now - t0, emitted, self.busy_slots, len(self._queue))

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [i for i, h in enumerate(self._slots) if h is None]
                if not free or not self._queue:
                    return
                h = self._queue.popleft()
            if h._cancel.is_set():
                h._finish(CANCELLED, time.perf_counter())
                self.metrics.finished(h)
                continue
            i = free[0]
            r = h.request
            ids = list(r.prompt)
            tokens, lengths = self.model.pad_prompt_batch([ids])
            row = row_settings(max_new_tokens=r.max_new_tokens, stop_ids=r.stop_ids, temperature=r.temperature,
                               top_k=r.top_k, top_p=r.top_p, seed=r.seed, max_stop_ids=self.max_stop_ids)
            t0 = time.perf_counter()
            self.state, tok, fin = self.programs.admit(self.model.params, self.state, jnp.int32(i),
                                                       jnp.asarray(tokens), jnp.asarray(lengths), row)
            tok, fin = int(tok), int(fin)
            now = time.perf_counter()
            self._slots[i] = h
            self.metrics.admitted(now - t0, len(ids))
            h._push(tok, now)
            if fin != RUNNING:
                self.state = self.programs.release(self.state, jnp.int32(i))
                self._free(i, FINISH_REASONS[fin])

    def _free(self, i: int, reason: str) -> None:
        h = self._slots[i]
        self._slots[i] = None
        h._finish(reason, time.perf_counter())
        self.metrics.finished(h)

    def run_until_idle(self, *, timeout: float | None = None) -> None:
        """Until the queue is empty and every slot is free: steps in the calling thread, or waits
        when the background thread runs the loop."""
        t_end = None if timeout is None else time.perf_counter() + timeout
        while self.has_work():
            if t_end is not None and time.perf_counter() > t_end:
                raise TimeoutError(f"requests still running after {timeout} s")
            if self._thread is not None:
                time.sleep(0.01)
            else:
                self.step()

    # ------------------------------------------------------------------ background thread

    @property
    def running(self) -> bool:
        """The background loop runs and new requests are accepted."""
        return self._thread is not None and self._thread.is_alive() and self._accepting and self._error is None

    def start(self) -> None:
        """Runs the loop in a background thread until `shutdown` (again after a shutdown)."""
        if self._thread is not None:
            return
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error}")
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="pikv-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._lock.wait(0.05)
                if self._stopping and not self.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # a failing program fails every request it held, and the engine stops
                self._fail_all(f"{type(e).__name__}: {e}")
                raise

    def _fail_all(self, error: str) -> None:
        with self._lock:
            self._error = error
            waiting = list(self._queue)
            self._queue.clear()
        failed = [h for h in self._slots if h is not None] + waiting
        self._slots = [None] * self.num_slots
        for h in failed:
            h._finish("error", time.perf_counter(), error)
            self.metrics.finished(h)

    def shutdown(self, *, cancel: bool = False, timeout: float | None = 60.0) -> None:
        """Stops accepting requests; finishes the ones in flight (or cancels them with `cancel`,
        queued ones included), then stops the background thread."""
        with self._lock:
            self._accepting = False
            if cancel:
                waiting = list(self._queue)
                self._queue.clear()
                for h in waiting:
                    h._finish(CANCELLED, time.perf_counter())
                    self.metrics.finished(h)
                for h in self._slots:
                    if h is not None:
                        h.cancel()
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.run_until_idle()  # without a thread: finish in-flight requests, or free the cancelled slots

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """The engine's metrics now (see serve.metrics.EngineMetrics.snapshot)."""
        return self.metrics.snapshot(busy=self.busy_slots, queued=len(self._queue)) | dict(
            policy=self.policy.label, max_prompt_tokens=self.max_prompt_tokens, max_new_tokens=self.max_new_tokens,
            steps_per_visit=self.steps_per_visit, slot_capacities=list(self.programs.capacities))


def warmup(engine: Engine, widths: Sequence[int] | None = None) -> float:
    """Compiles `admit` for each prompt-width bucket in `widths` (default: every bucket up to the
    engine's max_prompt_tokens) and `decode`, on throwaway requests; returns seconds spent."""
    t0 = time.perf_counter()
    model = engine.model
    if widths is None:
        widths = sorted({model.prompt_width([[0] * n]) for n in range(1, engine.max_prompt_tokens + 1, 32)}
                        | {model.prompt_width([[0] * engine.max_prompt_tokens])})
    for w in widths:
        n = min(w, engine.max_prompt_tokens)
        engine.submit(Request(prompt=[1] * n, max_new_tokens=min(2, engine.max_new_tokens), stop_ids=()))
    engine.run_until_idle()
    engine.metrics.reset()
    return time.perf_counter() - t0


__all__ = ["CANCELLED", "Engine", "Request", "RequestHandle", "parse_bytes", "warmup"]

