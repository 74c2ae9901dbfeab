"""An OpenAI-compatible HTTP front end for the serving engine (FastAPI).

    app = make_app(engine, model_name="smollm2")      # then run it with uvicorn (`pikv serve`)

Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events), GET
/v1/models, /metrics (engine.stats() as JSON, Prometheus text for `Accept: text/plain`) and
/health. Defaults follow OpenAI's (temperature 1, max_tokens 16 for completions); extensions
follow vLLM's names: top_k, stop_token_ids, ignore_eos, and `token_ids` in every choice so a
client can compare ids exactly. A stop token ends the text but is not part of it (its id is in
token_ids). Engine callbacks run on the engine thread and reach a request's asyncio.Queue through
`loop.call_soon_threadsafe`; a request whose client goes away is cancelled, so its slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pikv_jax.serve.engine import Engine, RequestHandle
from pikv_jax.serve.engine import Request as EngineRequest

FINISH = {"stop_token": "stop", "max_tokens": "length", "cache_full": "length"}
# OpenAI fields this server accepts only at their default (anything else would change the answer)
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": 0, "suffix": None,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None}


class ApiError(Exception):
    """An error answered as {"error": {"message", "type"}} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Options(BaseModel):
    """Fields shared by both endpoints (strict: "5" is not an integer, unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Options):
    prompt: Any
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(_Options):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _validated(cls, obj: dict):
    try:
        body = cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {field!r}") from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field {field!r}") from None
        raise ApiError(400, f"{field}: {err['msg']}") from None
    for name, default in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value not in (None, default) and value != {}:
            raise ApiError(400, f"{name}={value!r} is not supported by this server")
    return body


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (declared or streamed), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


class _Tokens:
    """Engine callbacks (engine thread) -> an asyncio.Queue on the server's loop; None ends it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is left to read it (never raise into the engine)
            pass

    def on_token(self, handle, token: int) -> None:
        self._put(token)

    def on_finish(self, handle) -> None:
        self._put(None)

    async def batches(self):
        """Lists of the tokens waiting at each wake-up, until the request finishes."""
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            tokens = [t for t in items if t is not None]
            if tokens:
                yield tokens
            if items[-1] is None:
                return


class _Text:
    """Incremental detokenization: decode the whole prefix and emit the new suffix, holding back a
    suffix that ends in an incomplete character; stop tokens are left out of the text."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, set(stop_ids), [], ""

    def add(self, tokens, *, final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(t for t in tokens if t not in self.stop)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


class _Job:
    """One HTTP request's generation: its engine handle, token queue, text and response shapes."""

    def __init__(self, engine: Engine, model_name: str, ids: list[int], body: _Options, *, chat: bool):
        model = engine.model
        n = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        if n is None:
            n = engine.max_new_tokens if chat else min(16, engine.max_new_tokens)
        if not 1 <= n <= engine.max_new_tokens:
            raise ApiError(400, f"max_tokens must be in [1, {engine.max_new_tokens}] (this server's "
                                f"max_new_tokens), got {n}")
        stop = [] if body.ignore_eos else list(model.stop_ids())
        stop += body.stop_token_ids or []
        stop += [_stop_token(model, s) for s in ([body.stop] if isinstance(body.stop, str) else body.stop or [])]
        seed = body.seed if body.seed is not None else (secrets.randbelow(2**31) if body.temperature > 0 else 0)
        request = EngineRequest(prompt=ids, max_new_tokens=n, stop_ids=tuple(dict.fromkeys(stop)),
                                temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed)
        self.tokens = _Tokens(asyncio.get_running_loop())
        try:
            self.handle: RequestHandle = engine.submit(request, on_token=self.tokens.on_token,
                                                       on_finish=self.tokens.on_finish)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), "unavailable") from None
        self.chat, self.model_name, self.prompt_tokens = chat, model_name, len(ids)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.text = _Text(model.tokenizer, self.handle.request.stop_ids)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self) -> dict:
        n = len(self.handle.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _envelope(self, choices: list, *, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def chunk(self, text: str, token_ids: list[int], finish: str | None = None, *, first: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish, "token_ids": token_ids}
        return _sse(self._envelope([choice], chunk=True))

    def completion(self) -> dict:
        text = self.text.add(self.handle.tokens, final=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else {
            "index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": _finish(self.handle), "token_ids": list(self.handle.tokens)}
        return self._envelope([choice], chunk=False, usage=self.usage())

    async def events(self):
        """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
        if self.chat:
            yield self.chunk("", [], first=True)
        async for tokens in self.tokens.batches():
            yield self.chunk(self.text.add(tokens), tokens)
        h = self.handle
        if h.finish_reason == "error":
            yield _sse({"error": {"message": h.error or "generation failed", "type": "server_error", "code": 500}})
        else:
            yield self.chunk(self.text.add([], final=True), [], _finish(h))
            if self.include_usage:
                yield _sse(self._envelope([], chunk=True, usage=self.usage()))
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _finish(handle: RequestHandle) -> str:
    return FINISH.get(handle.finish_reason, handle.finish_reason)


def _stop_token(model, text) -> int:
    """A stop string as the single token it encodes to (the engine stops on token ids)."""
    if model.tokenizer is None:
        raise ApiError(400, "stop strings need a tokenizer and this model has none: use stop_token_ids")
    ids = model.tokenizer.encode(text, add_bos=False)
    if len(ids) != 1:
        raise ApiError(400, f"stop string {text!r} encodes to {len(ids)} tokens; only single-token stop strings "
                            "are supported (or pass stop_token_ids)")
    return ids[0]


def _prompt_ids(model, prompt) -> list[int]:
    if isinstance(prompt, str):
        try:
            return model.encode(prompt)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "batched prompts are not supported: send one prompt per request")
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(400, "prompt must be a string or a list of token ids (integers)")
    return prompt


def _chat_ids(model, messages: list[dict]) -> list[int]:
    if model.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so no chat template: use /v1/completions with a "
                            "list of token ids")
    if not messages:
        raise ApiError(400, "messages is empty")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] needs a string 'role' and a string 'content'")
        out.append({"role": m["role"], "content": content})
    try:
        return model.tokenizer.encode(model.tokenizer.apply_chat_template(out, add_generation_prompt=True))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only a disconnect arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _CancellingStream(StreamingResponse):
    """A stream whose request is cancelled however it ends (disconnect, error, server shutdown)."""

    def __init__(self, job: _Job):
        super().__init__(job.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.handle.cancel()  # a no-op once the request has finished


async def _answer(request: Request, job: _Job, *, stream: bool) -> Response:
    """A stream of events, or the whole completion once the request finishes; a client that
    leaves while it waits cancels its request."""
    if stream:
        return _CancellingStream(job)
    done = asyncio.ensure_future(_drain(job.tokens))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        gone.cancel()
        job.handle.cancel()
    if not job.handle.done:
        return Response(status_code=499)  # the client left; nobody reads this
    if job.handle.finish_reason == "error":
        raise ApiError(500, job.handle.error or "generation failed", "server_error")
    if job.handle.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled: the server is shutting down", "unavailable")
    return JSONResponse(job.completion())


async def _drain(tokens: _Tokens) -> None:
    async for _ in tokens.batches():
        pass


def _finite(obj):
    """NaN/inf -> None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _num(x) -> str:
    if isinstance(x, int):
        return str(x)
    x = float(x)
    return "NaN" if x != x else ("+Inf" if x == math.inf else "-Inf" if x == -math.inf else repr(x))


def prometheus_text(stats: dict, model_name: str) -> str:
    """engine.stats() in Prometheus' text format: numbers as gauges, distributions by `stat`."""
    lines = [f'pikv_info{{model={json.dumps(model_name)},policy={json.dumps(str(stats.get("policy", "")))}}} 1']
    for key, v in stats.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines.append(f"pikv_{key} {_num(v)}")
        elif key == "finish_reasons":
            lines += [f'pikv_requests_finished_by_reason{{reason="{r}"}} {n}' for r, n in v.items()]
        elif isinstance(v, dict):
            lines += [f'pikv_{key}{{stat="{s}"}} {_num(x)}' for s, x in v.items()]
    return "\n".join(lines) + "\n"


def make_app(engine: Engine, *, model_name: str, max_body_bytes: int = 1 << 20,
             cancel_on_shutdown: bool = False) -> FastAPI:
    """The HTTP app over `engine`. It starts the engine's thread on startup (if not running) and
    shuts the engine down on app shutdown, finishing in-flight requests or, with
    `cancel_on_shutdown`, cancelling them."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, cancel=cancel_on_shutdown)

    app = FastAPI(title="pikv", lifespan=lifespan, docs_url=None, redoc_url=None)
    model = engine.model

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.message, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _validated(CompletionBody, await _read_json(request, max_body_bytes))
        job = _Job(engine, model_name, _prompt_ids(model, body.prompt), body, chat=False)
        return await _answer(request, job, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _validated(ChatBody, await _read_json(request, max_body_bytes))
        job = _Job(engine, model_name, _chat_ids(model, body.messages), body, chat=True)
        return await _answer(request, job, stream=body.stream)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "pikv"}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        stats = engine.stats()
        accept = request.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return PlainTextResponse(prometheus_text(stats, model_name), media_type="text/plain; version=0.0.4")
        return JSONResponse(_finite(stats | {"model": model_name}))

    @app.get("/health")
    async def health():
        ok = engine.running
        body = {"status": "ok" if ok else "stopped", "slots": engine.num_slots, "slots_busy": engine.busy_slots,
                "queue_length": engine.queue_length}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


__all__ = ["ApiError", "ChatBody", "CompletionBody", "make_app", "prometheus_text"]
