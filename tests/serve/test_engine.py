"""The serving engine against `PiKVModel.generate`: every request of a mixed workload (different
prompt lengths, max_new_tokens, stop ids, arrival order, more requests than slots) gets exactly
the tokens and finish reason `generate` gives it alone under the engine's slot policy; plus slot
sizing from a memory budget, cancellation, seeded sampling, compile counts and bad input.

On the tiny random Llama of conftest (`tiny_lm`), whose greedy continuations vary.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pikv_jax.eval.methods import parse_method
from pikv_jax.serve.engine import Engine, Request, parse_bytes, warmup

MAX_PROMPT, MAX_NEW = 96, 12
METHODS = ["full", "h2o@0.25", "int4(group_size=8,residual_length=16)",
           "h2o@0.25+int4(group_size=8,residual_length=16)"]


def _policy(model, spec):
    return parse_method(spec, model=model, context_len=MAX_PROMPT).policy


def _workload(model, n=9, seed=0, policy=None):
    """Prompts of 3..96 tokens and max_new_tokens of 1, 5 or 12 (few distinct settings, so the
    reference `generate` calls compile few programs); with `policy`, every third request gets stop
    ids holding the third token of its own greedy continuation (so stop tokens are hit)."""
    rng = np.random.default_rng(seed)
    lens = [3, 96, 40, 17, 70, 5, 64, 30, 88][:n]
    reqs = [Request(prompt=rng.integers(3, model.config.vocab_size, k).tolist(),
                    max_new_tokens=[12, 5, 1, 12, 5, 12, 5, 12, 12][i], stop_ids=()) for i, k in enumerate(lens)]
    if policy is not None:
        stoppers = range(0, n, 3)
        stop = tuple(model.generate([reqs[i].prompt], MAX_NEW, policy=policy, stop_ids=()).token_ids[0][2]
                     for i in stoppers)
        reqs = [dataclasses.replace(r, stop_ids=stop) if i in stoppers else r for i, r in enumerate(reqs)]
    return reqs


def _alone(model, engine, r: Request):
    out = model.generate([list(r.prompt)], r.max_new_tokens, policy=engine.policy, stop_ids=r.stop_ids,
                         temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed)
    return out.token_ids[0], out.finish_reasons[0]


@pytest.mark.parametrize("spec", METHODS)
def test_every_request_equals_generate_alone(tiny_lm, spec):
    model, _ = tiny_lm
    engine = Engine(model, _policy(model, spec), max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW,
                    num_slots=3, steps_per_visit=3)
    reqs = _workload(model, policy=engine.policy)
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]  # arrival order differs from the list; finish order differs again
    handles = {}
    for k, i in enumerate(order):
        handles[i] = engine.submit(reqs[i])
        if k % 3 == 2:
            engine.step()  # requests arrive while others decode
    engine.run_until_idle(timeout=600)
    reasons = set()
    for i, r in enumerate(reqs):
        want, why = _alone(model, engine, r)
        assert handles[i].tokens == want, (spec, i)
        assert handles[i].finish_reason == why, (spec, i)
        reasons.add(why)
    assert {"max_tokens", "stop_token"} <= reasons  # the workload exercises both
    assert engine.busy_slots == 0 and engine.queue_length == 0
    st = engine.stats()
    assert st["requests_finished"] == len(reqs) and st["output_tokens"] == sum(len(h.tokens) for h in handles.values())


def test_seeded_sampling_equals_generate_alone(tiny_lm):
    """Rows with different sampling settings share the pool and the decode program; each draws
    what generate draws for it alone with its seed."""
    model, _ = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=2, steps_per_visit=5)
    base = _workload(model, 4, seed=3)
    reqs = [Request(prompt=r.prompt, max_new_tokens=MAX_NEW, stop_ids=(), temperature=t, top_k=k, top_p=p, seed=s)
            for r, (t, k, p, s) in zip(base, [(0.9, 0, 1.0, 1), (1.3, 20, 1.0, 2), (0.0, 0, 1.0, 0), (1.0, 0, 0.8, 4)])]
    handles = [engine.submit(r) for r in reqs]
    engine.run_until_idle(timeout=600)
    for h, r in zip(handles, reqs):
        assert h.tokens == _alone(model, engine, r)[0]
    again = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=2)
    h2 = again.submit(reqs[0])
    other = again.submit(dataclasses.replace(reqs[0], seed=99))
    again.run_until_idle(timeout=600)
    assert h2.tokens == handles[0].tokens and other.tokens != handles[0].tokens


def test_slots_from_memory_budget_and_compression_buys_slots(tiny_lm):
    model, _ = tiny_lm
    full = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=1)
    budget = int(full.slot_bytes * 4.5)
    e_full = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, cache_memory=budget)
    assert e_full.num_slots == 4
    assert e_full.cache_bytes_allocated <= budget
    # the allocated pool is what the arrays take: slot_bytes per slot, measured from the pool itself
    assert e_full.cache_bytes_allocated == sum(x.nbytes for x in jax.tree_util.tree_leaves(e_full.state.cache))
    small = Engine(model, _policy(model, "h2o@0.25"), max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW,
                   cache_memory=budget)
    ratio = full.slot_bytes / small.slot_bytes
    assert small.num_slots == budget // small.slot_bytes and small.num_slots > 2 * e_full.num_slots
    assert ratio > 2.5  # 24 prompt + 0 room (decode-time eviction) vs 96 + 12 slots, plus scores


def test_cancel_frees_the_slot_and_leaves_others_exact(tiny_lm):
    model, _ = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=2, steps_per_visit=2)
    reqs = [dataclasses.replace(r, max_new_tokens=MAX_NEW, stop_ids=()) for r in _workload(model, 3, seed=5)]
    a, b, c = (engine.submit(r) for r in reqs)
    engine.step()
    a.cancel()
    engine.run_until_idle(timeout=600)
    assert a.finish_reason == "cancelled" and 1 <= len(a.tokens) < MAX_NEW
    assert b.tokens == _alone(model, engine, reqs[1])[0] and c.tokens == _alone(model, engine, reqs[2])[0]
    assert engine.busy_slots == 0 and engine.stats()["finish_reasons"] == {"cancelled": 1, "max_tokens": 2}


def test_no_compile_after_warmup(tiny_lm):
    from test_generate import compiled_functions

    model, _ = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=3)
    warmup(engine)
    with compiled_functions() as names:
        for r in _workload(model):
            engine.submit(r)
        engine.run_until_idle(timeout=600)
    assert not [n for n in names if n in ("admit", "decode", "release")], names


def test_bad_requests_and_settings_raise_clear_errors(tiny_lm):
    model, _ = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=1)
    with pytest.raises(ValueError, match="longer than this engine's max_prompt_tokens=96"):
        engine.submit(Request(prompt=[5] * 97))
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer in \[1, 12\]"):
        engine.submit(Request(prompt=[5], max_new_tokens=13))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit(Request(prompt=[]))
    with pytest.raises(ValueError, match="token ids outside"):
        engine.submit(Request(prompt=[5, 1000]))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request(prompt=[5], max_new_tokens=4, top_p=0.0))
    with pytest.raises(ValueError, match="holds no slot"):
        Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, cache_memory="1KiB")
    with pytest.raises(ValueError, match="exactly one of num_slots or cache_memory"):
        Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model, None, max_prompt_tokens=500, max_new_tokens=100, num_slots=1)
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("lots")
    assert engine.queue_length == 0  # nothing bad was queued


def test_a_failing_callback_cancels_only_its_request_and_shutdown_restart(tiny_lm):
    model, _ = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=2, steps_per_visit=2)
    reqs = [dataclasses.replace(r, max_new_tokens=MAX_NEW, stop_ids=()) for r in _workload(model, 2, seed=7)]

    def boom(handle, token):
        raise RuntimeError("client went away")

    bad = engine.submit(reqs[0], on_token=boom)
    good = engine.submit(reqs[1])
    engine.start()
    assert engine.running
    assert good.wait(120) and bad.wait(120)
    assert bad.finish_reason == "cancelled" and "client went away" in bad.error
    assert good.tokens == _alone(model, engine, reqs[1])[0]
    engine.shutdown()
    assert not engine.running
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(reqs[1])
    engine.start()  # serves again after a shutdown
    again = engine.submit(reqs[1])
    assert again.wait(120) and again.tokens == good.tokens
    engine.shutdown()
    # without a thread, a cancelling shutdown frees the slots and the queue
    local = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=1)
    first, queued = local.submit(reqs[0]), local.submit(reqs[1])
    local.step()
    local.shutdown(cancel=True)
    assert first.finish_reason == queued.finish_reason == "cancelled"
    assert local.busy_slots == 0 and local.queue_length == 0
