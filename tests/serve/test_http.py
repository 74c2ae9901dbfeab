"""The HTTP server (serve/http.py, `pikv serve`) through a real socket and client (uvicorn in a
thread, httpx): completions streamed or not carry exactly the ids `generate` gives each request
alone; bad requests get clear 4xx errors and the server keeps serving; a client that leaves frees
its slot; 200 requests 16 at a time lose or duplicate no token; shutdown finishes in-flight
requests; `pikv serve` refuses a public host.

On the tiny random Llama of conftest (`tiny_lm`), which has no tokenizer: prompts are token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from pikv_jax.serve.engine import Engine, Request
from pikv_jax.serve.http import FINISH, make_app

MAX_PROMPT, MAX_NEW, N = 16, 32, 8  # N: max_tokens of most requests (one `generate` program)
BODY_LIMIT = 1 << 16


@contextlib.contextmanager
def serving(app):
    """Runs `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields its base URL and
    stops it (app shutdown included) on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(60)


@dataclasses.dataclass
class Served:
    url: str
    engine: Engine
    model: object
    prompts: list
    expected: dict

    def alone(self, prompt_index: int, n: int = N, **kw) -> list[int]:
        """`generate` of one prompt alone under the engine's policy (cached: few programs compile)."""
        key = (prompt_index, n, tuple(sorted(kw.items())))
        if key not in self.expected:
            out = self.model.generate([self.prompts[prompt_index]], n, policy=self.engine.policy, **kw)
            self.expected[key] = (out.token_ids[0], FINISH[out.finish_reasons[0]])
        return self.expected[key]


@pytest.fixture(scope="module")
def served(tiny_lm):
    model, prompts = tiny_lm
    rng = np.random.default_rng(11)
    prompts = prompts + [rng.integers(3, model.config.vocab_size, n).tolist() for n in (5, MAX_PROMPT)]
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=8,
                    steps_per_visit=2)
    with serving(make_app(engine, model_name="tiny", max_body_bytes=BODY_LIMIT)) as (url, _):
        yield Served(url, engine, model, prompts, {})


def sse(lines) -> list:
    """The `data:` payloads of a server-sent event stream: JSON chunks, then the literal [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def streamed(client, path="/v1/completions", **body):
    """(token ids, finish_reason, chunks) of a streamed request."""
    with client.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r.iter_lines())
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    return ids, chunks[-1]["choices"][0]["finish_reason"], chunks


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_completions_equal_generate_streamed_or_not(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        for i, prompt in enumerate(served.prompts[:3]):
            want, why = served.alone(i)
            r = c.post("/v1/completions", json=dict(prompt=prompt, max_tokens=N, temperature=0))
            assert r.status_code == 200, r.text
            out = r.json()
            choice = out["choices"][0]
            assert out["object"] == "text_completion" and out["model"] == "tiny"
            assert choice["token_ids"] == want and choice["finish_reason"] == why
            assert choice["text"] == ""  # no tokenizer
            assert out["usage"] == dict(prompt_tokens=len(prompt), completion_tokens=len(want),
                                        total_tokens=len(prompt) + len(want))
            ids, finish, chunks = streamed(c, prompt=prompt, max_tokens=N, temperature=0)
            assert ids == want and finish == why and len({ch["id"] for ch in chunks}) == 1
        # a stop token (ignore_eos: only the given ids stop), and seeded sampling with top_k
        greedy = served.alone(0)[0]
        want, why = served.alone(0, stop_ids=(greedy[2],))
        ids, finish, _ = streamed(c, prompt=served.prompts[0], max_tokens=N, temperature=0, ignore_eos=True,
                                  stop_token_ids=[greedy[2]])
        assert (ids, finish) == (want, why) and why == "stop" and ids[-1] == greedy[2]
        want, _ = served.alone(1, temperature=0.9, top_k=20, seed=3)
        body = dict(prompt=served.prompts[1], max_tokens=N, temperature=0.9, top_k=20, seed=3)
        assert c.post("/v1/completions", json=body).json()["choices"][0]["token_ids"] == want
        assert streamed(c, **body)[0] == want


BAD = [  # (raw body or JSON object, status, words of the message)
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"max_tokens": 4}, 400, "missing required field 'prompt'"),
    ({"prompt": [5] * (MAX_PROMPT + 1)}, 400, f"longer than this engine's max_prompt_tokens={MAX_PROMPT}"),
    ({"prompt": [5], "max_tokens": 0}, 400, f"max_tokens must be in [1, {MAX_NEW}]"),
    ({"prompt": [5], "max_tokens": MAX_NEW + 1}, 400, f"max_tokens must be in [1, {MAX_NEW}]"),
    ({"prompt": [5], "max_tokens": "8"}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": [5], "temperature": "hot"}, 400, "temperature"),
    ({"prompt": [5], "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"prompt": [5], "seed": -1}, 400, "seed must be an integer"),
    ({"prompt": [5, "a"]}, 400, "list of token ids"),
    ({"prompt": [[5], [6]]}, 400, "batched prompts are not supported"),
    ({"prompt": [5, 1000]}, 400, "token ids outside [0, 97)"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": "some text"}, 400, "no tokenizer"),
    ({"prompt": [5], "stop": "x"}, 400, "stop strings need a tokenizer"),
    ({"prompt": [5], "n": 3}, 400, "n=3 is not supported"),
    ({"prompt": [5], "max_token": 4}, 400, "unknown field 'max_token'"),
    ({"prompt": [5], "pad": "x" * BODY_LIMIT}, 413, f"exceeds the limit of {BODY_LIMIT} bytes"),
]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        for body, status, words in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (body if len(raw) < 200 else words, r.text)
            err = r.json()["error"]
            assert words in err["message"] and err["type"], (words, err)
        # a body streamed without a length is cut off at the limit too
        chunks = iter([b'{"prompt": [5], "pad": "', b"x" * BODY_LIMIT, b'"}'])
        r = c.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
        assert c.get("/v1/completions").status_code == 405 and c.get("/nowhere").status_code == 404
        # still serving, exactly
        r = c.post("/v1/completions", json=dict(prompt=served.prompts[2], max_tokens=N, temperature=0))
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == served.alone(2)[0]
        assert c.get("/health").json()["status"] == "ok"
    assert served.engine.queue_length == 0


def test_a_client_that_leaves_frees_its_slot(served, monkeypatch):
    engine = served.engine
    step = engine.step

    def slow_step():  # 0.1 s per visit: a 32-token request takes ~1.6 s, so the client leaves mid-way
        time.sleep(0.1)
        step()

    monkeypatch.setattr(engine, "step", slow_step)
    cancelled = engine.stats()["finish_reasons"].get("cancelled", 0)
    body = dict(prompt=served.prompts[0], max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert len(json.loads(first[6:])["choices"][0]["token_ids"]) < MAX_NEW
        # leaving the block closed the connection mid-stream; a non-streaming client gives up too
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body, timeout=0.5)
    wait_until(lambda: engine.busy_slots == 0 and engine.queue_length == 0, 10, "slots freed")
    assert engine.stats()["finish_reasons"]["cancelled"] == cancelled + 2


def test_200_requests_16_at_a_time_equal_generate(served):
    """Five prompts, streamed and not: every answer is its prompt's `generate` output, no token lost
    or repeated, and no slot stays busy."""
    want = [served.alone(i) for i in range(len(served.prompts))]
    before = served.engine.stats()

    async def one(client, gate, k):
        i = k % len(served.prompts)
        body = dict(prompt=served.prompts[i], max_tokens=N, temperature=0)
        async with gate:
            if k % 2:
                async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                    chunks = sse([line async for line in r.aiter_lines()])
                ids = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
                return i, ids, chunks[-1]["choices"][0]["finish_reason"]
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return i, r.json()["choices"][0]["token_ids"], r.json()["choices"][0]["finish_reason"]

    async def run_all():
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=httpx.Limits(max_connections=16)) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, gate, k) for k in range(200))), 50)

    t0 = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed = time.perf_counter() - t0
    assert len(results) == 200
    for i, ids, finish in results:
        assert (ids, finish) == want[i], i
    wait_until(lambda: served.engine.busy_slots == 0, 10, "slots freed")
    after = served.engine.stats()
    assert after["requests_finished"] - before["requests_finished"] == 200
    assert after["output_tokens"] - before["output_tokens"] == sum(len(ids) for _, ids, _ in results)
    print(f"200 requests in {elapsed:.1f} s")


def test_metrics_and_health(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        m = c.get("/metrics").json()
        assert m["slots"] == 8 and m["slots_busy"] == 0 and m["model"] == "tiny" and m["policy"] == "full"
        assert m["requests_finished"] >= 1 and m["slot_bytes"] == served.engine.slot_bytes
        text = c.get("/metrics", headers={"accept": "text/plain"}).text
        assert "pikv_slots 8\n" in text and 'pikv_info{model="tiny",policy="full"} 1' in text
        assert c.get("/health").json() == dict(status="ok", slots=8, slots_busy=0, queue_length=0)
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_shutdown_finishes_requests_in_flight(tiny_lm, monkeypatch):
    model, prompts = tiny_lm
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=1, steps_per_visit=2)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step()))
    got = {}
    with serving(make_app(engine, model_name="tiny")) as (url, server):
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=dict(prompt=prompts[0], max_tokens=MAX_NEW, temperature=0,
                                                               ignore_eos=True, stream=True)) as r:
                lines = r.iter_lines()
                got["first"] = next(line for line in lines if line.startswith("data: "))
                server.should_exit = True  # shut down while the request decodes
                rest = sse(list(lines))
    ids = json.loads(got["first"][6:])["choices"][0]["token_ids"] + [t for ch in rest
                                                                     for t in ch["choices"][0]["token_ids"]]
    assert len(ids) == MAX_NEW and rest[-1]["choices"][0]["finish_reason"] == "length"
    assert engine.busy_slots == 0 and not engine.running  # the app shut the engine down
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Request(prompt=prompts[0], max_new_tokens=2))


def _worded(model):
    """The tiny model with a word-level tokenizer (token i <-> "w{i}", 2 = end of sequence) and a
    plain chat template, so that text prompts, chat and stop strings run without a real model."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from pikv_jax.api import PiKVModel
    from pikv_jax.models.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, model.config.vocab_size)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    template = "{% for m in messages %}{{ m.content }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}"
    tok = Tokenizer(backend, bos_token_id=1, eos_token_id=2, add_bos=True, chat_template=template)
    return PiKVModel(model.model, tok, model.config)


def test_text_prompts_chat_and_stop_strings_with_a_tokenizer(tiny_lm):
    model = _worded(tiny_lm[0])
    tok = model.tokenizer
    engine = Engine(model, None, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, num_slots=2, steps_per_visit=2)
    text = lambda ids: tok.decode([t for t in ids if t != 2])
    with serving(make_app(engine, model_name="worded")) as (url, _), httpx.Client(base_url=url, timeout=120) as c:
        prompt = "w5 w17 w33 w8"
        want = model.generate([prompt], N, policy=engine.policy).token_ids[0]
        out = c.post("/v1/completions", json=dict(prompt=prompt, max_tokens=N, temperature=0)).json()
        assert out["choices"][0]["token_ids"] == want and out["choices"][0]["text"] == text(want) != ""
        assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt))
        ids, _, chunks = streamed(c, prompt=prompt, max_tokens=N, temperature=0)
        assert ids == want and "".join(ch["choices"][0]["text"] for ch in chunks) == text(want)
        # a stop string that is one token ends the answer, and is left out of its text
        stop = f"w{want[2]}"
        cut = model.generate([prompt], N, policy=engine.policy, stop_ids=(2, want[2])).token_ids[0]
        out = c.post("/v1/completions", json=dict(prompt=prompt, max_tokens=N, temperature=0, stop=[stop])).json()
        assert out["choices"][0]["token_ids"] == cut and out["choices"][0]["finish_reason"] == "stop"
        assert out["choices"][0]["text"] == text(cut[:-1])
        r = c.post("/v1/completions", json=dict(prompt=prompt, stop="w5 w6"))
        assert r.status_code == 400 and "encodes to 2 tokens" in r.json()["error"]["message"]
        # chat: the template's ids, streamed as deltas after a first chunk with the role
        messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": [{"type": "text", "text": "w7"}]}]
        ids_in = tok.encode(tok.apply_chat_template([messages[0], {"role": "user", "content": "w7"}]))
        want = model.generate([ids_in], N, policy=engine.policy).token_ids[0]
        out = c.post("/v1/chat/completions", json=dict(messages=messages, max_tokens=N, temperature=0)).json()
        assert out["object"] == "chat.completion" and out["choices"][0]["token_ids"] == want
        assert out["choices"][0]["message"] == {"role": "assistant", "content": text(want)}
        ids, _, chunks = streamed(c, "/v1/chat/completions", messages=messages, max_tokens=N, temperature=0)
        assert ids == want and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == text(want)
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)


def test_cli_refuses_a_public_host():
    from test_cli import _pikv

    proc = _pikv("serve", "--model", "random:llama", "--host", "0.0.0.0", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and lines[0].startswith("pikv: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_serve_replay_over_http_equals_generate(served):
    """`pikv bench-serve --url`'s replay: a seeded Poisson workload streamed to the server; every
    request gets its `generate` tokens (ignore_eos: exactly max_tokens) and the client-side
    latencies are measured."""
    from pikv_jax.serve.client import replay_http
    from pikv_jax.serve.workload import WorkloadSpec, make_workload

    spec = WorkloadSpec(n_requests=12, rate=200.0, prompt_min=3, prompt_max=MAX_PROMPT, output_min=N, output_max=N,
                        seed=4)
    source = np.random.default_rng(2).integers(3, served.model.config.vocab_size, 64).tolist()
    workload = make_workload(spec, source)
    assert workload == make_workload(spec, source)  # deterministic per seed
    assert len({len(tr.request.prompt) for tr in workload}) > 3 and workload[-1].at > 0
    r = replay_http(served.url, workload, concurrency=4, model="tiny")
    st = r["stats"]
    assert st["n_errors"] == 0 and st["requests_ok"] == 12 and st["output_tokens"] == 12 * N
    assert st["ttft_ms"]["n"] == 12 and 0 < st["ttft_ms"]["median"] <= st["ttft_ms"]["p99"]
    for tr, rec in zip(workload, r["requests"]):
        want = served.model.generate([list(tr.request.prompt)], N, policy=served.engine.policy, stop_ids=())
        assert rec["tokens"] == want.token_ids[0]
    wait_until(lambda: served.engine.busy_slots == 0, 10, "slots freed")


def test_bench_serve_cli_engine_mode(tmp_path):
    """`pikv bench-serve` on a random MoE model (no tokenizer: random prompt ids), with the static
    baseline; the JSON holds both runs' metrics."""
    from pikv_jax.cli.main import main

    out = tmp_path / "b.json"
    rc = main(["bench-serve", "--model", "random:mixtral-tiny", "--method", "h2o@0.5", "--slots", "3",
               "--max-prompt-tokens", "64", "--max-new-tokens", "8", "--requests", "5", "--prompt-min", "10",
               "--prompt-max", "60", "--output-min", "2", "--output-max", "8", "--static-baseline",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["engine"]["requests_finished"] == 5 and data["engine"]["slots"] == 3
    assert data["engine"]["output_tokens"] == data["static"]["output_tokens"]
    assert main(["bench-serve", "--model", "random:mixtral-tiny", "--prompt-max", "4096"]) == 2
