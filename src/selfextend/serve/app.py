"""The OpenAI-compatible HTTP API over an ``Engine``: routes, request schemas, errors, the request queue.

Requests are validated and tokenized in the event loop (a bad request never waits in the queue), then run one
at a time, in arrival order, by a single worker thread that owns the model. The queue is bounded: when it is
full the server answers 503 at once, with the place the request would take in the queue and an estimated wait
(from the measured prefill and decode rates). A client that disconnects (mid-stream or while waiting)
cancels its request, which frees the worker within one prefill chunk or one token. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Shutdown (``Worker.begin_shutdown``, which ``server.Server`` calls on Ctrl-C): queued requests are refused at
once, the running one may finish until its deadline (``--grace``) and is then stopped at its next chunk or
token and answered with a 503 ``shutting_down`` error (a stream: an error event, then ``data: [DONE]``);
``Worker.abort`` (a second Ctrl-C) answers it at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ContextLengthError, Engine, Result, Sampling

logger = logging.getLogger("selfextend.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers, self.extra = headers, extra or {}

    @property
    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def shutting_down(message: str = "the server is shutting down") -> APIError:
    return APIError(503, message, "server_error", code="shutting_down")


# --- request schemas: the fields we honour are typed; others OpenAI clients send are accepted and ignored ---


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then the Result or an error
    cancelled: bool = False  # the client went away (or its handler ended)
    answered: bool = False  # the Result or an error was sent: nothing follows it
    to_prefill: int = 0  # prompt tokens the prefix cache did not hold when it was queued (for estimates)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, item: Any) -> None:
        """A piece of text (from the worker thread)."""
        if not self.answered:
            self._put(item)

    def finish(self, item: Result | APIError) -> bool:
        """The last event, sent once whoever sends it (the worker, or a shutdown from the event loop)."""
        with self._lock:
            if self.answered:
                return False
            self.answered = True
        self._put(item)
        return True

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed (an immediate exit): nobody is listening
            pass


class Worker:
    """The single thread that runs jobs in order on the engine."""

    POLL = 0.1  # seconds the idle thread waits for a job before it looks for a shutdown

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="selfextend-worker", daemon=True)
        self.busy = False
        self.current: Job | None = None
        self.stopping = False  # no job starts any more
        self.deadline = math.inf  # time.monotonic() after which the running job stops at its next chunk/token
        self.aborted = False  # stop now: the running job was answered already

    def start(self) -> None:
        self.thread.start()

    def begin_shutdown(self, deadline: float | None = None) -> None:
        """Refuse the queued jobs now and start no other; the running one may go on until ``deadline``
        (``time.monotonic()``; None: now), then stops at its next chunk or token and gets a 503. From the
        event loop or any thread, never from a signal handler (it takes the queue's lock)."""
        self.deadline = min(self.deadline, time.monotonic() if deadline is None else deadline)
        self.stopping = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.finish(shutting_down("the server is shutting down; this request had not started"))

    def abort(self) -> None:
        """Stop now: the running job is answered at once (its thread stops at its next chunk or token)."""
        self.aborted = True
        self.begin_shutdown()
        job = self.current
        if job is not None:
            job.finish(shutting_down("the server is shutting down (stopped at once); this request was not "
                                     "finished"))

    async def wait_stopped(self) -> None:
        """Until the thread has ended, or ``abort`` (whose caller exits without waiting for it)."""
        while self.thread.is_alive() and not self.aborted:
            await asyncio.sleep(0.05)

    def _stop_now(self, job: Job) -> bool:
        return (job.cancelled or job.answered or self.aborted
                or (self.stopping and time.monotonic() >= self.deadline))

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise shutting_down()
        job.to_prefill = len(job.prompt) - self.engine.prefix_cache.reusable(job.prompt)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise self._busy(job) from None

    def queue_state(self) -> dict[str, Any]:
        """The running request's progress, the live queued ones and the estimated seconds until the last of
        them is done (None until a prefill was measured)."""
        engine = self.engine
        with self.jobs.mutex:
            queued = list(self.jobs.queue)
        live = [j for j in queued if not (j.cancelled or j.answered)]
        running = engine.running
        left = engine.seconds_left()
        each = [engine.estimate(j.to_prefill, j.sampling.max_tokens) for j in live]
        wait = None if left is None or None in each else left + sum(each)
        rate = engine.prefill_rate.value
        state: dict[str, Any] = {
            "waiting": len(queued), "estimated_wait_s": None if wait is None else round(wait, 1),
            "prefill_tokens_per_s": None if rate is None else round(rate, 1),
            "running": None if running is None else {
                "prompt_tokens": running.prompt_tokens, "cached_tokens": running.cached,
                "to_prefill": running.to_prefill, "prefilled": running.prefilled,
                "generated": running.generated,
                "estimated_left_s": None if left is None else round(left, 1)}}
        return state

    def _busy(self, job: Job) -> APIError:
        state = self.queue_state()
        position = state["waiting"] + 1
        wait, left = state["estimated_wait_s"], (state["running"] or {}).get("estimated_left_s")
        own = self.engine.estimate(job.to_prefill, job.sampling.max_tokens)
        running = state["running"]
        doing = ""
        if running is not None and running["prefilled"] < running["to_prefill"]:
            doing = (f"; the running one has read {running['prefilled']} of its {running['to_prefill']} new "
                     "prompt tokens")
        if wait is None:
            when = "no wait estimate yet (no prefill measured)"
        else:
            when = (f"it would start in about {wait:.0f} s (prompts are read at "
                    f"{state['prefill_tokens_per_s']:.0f} tokens/s) and take about {own:.0f} s itself")
        retry = 5 if left is None else max(1, math.ceil(left))
        message = (f"the server is busy: {state['waiting']} requests are waiting (--max-queue) and this one "
                   f"would be number {position} in the queue{doing}; {when}; retry after {retry} s")
        extra = {"queue_position": position, "estimated_wait_s": wait,
                 "estimated_seconds": None if own is None else round(own, 1), "queue": state}
        return APIError(503, message, "server_error", code="server_busy", headers={"Retry-After": str(retry)},
                        extra=extra)

    def _run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.POLL)
            except queue.Empty:
                if self.stopping:
                    return
                continue
            if job.cancelled or job.answered:
                continue
            if self.stopping:
                job.finish(shutting_down("the server is shutting down; this request had not started"))
                continue
            self.current, self.busy = job, True
            try:
                on_text = job.emit if job.stream else None
                result = self.engine.generate(job.prompt, job.sampling, on_text=on_text,
                                              cancelled=lambda job=job: self._stop_now(job))
                if result.finish_reason == "cancelled" and not job.cancelled:
                    job.finish(self._stopped(result))
                else:
                    job.finish(result)
            except ContextLengthError as err:
                job.finish(APIError(400, str(err), param="messages", code="context_length_exceeded"))
            except Exception as err:  # noqa: BLE001 - one failed request must not stop the worker
                logger.exception("request failed")
                job.finish(APIError(500, f"generation failed: {type(err).__name__}: {err}", "server_error"))
            finally:
                self.current, self.busy = None, False

    @staticmethod
    def _stopped(result: Result) -> APIError:
        """The answer to a request the shutdown stopped after its grace period."""
        if result.prefilled < result.to_prefill:
            where = f"while reading its prompt ({result.prefilled} of {result.to_prefill} new tokens read)"
        else:
            where = f"after {result.completion_tokens} generated tokens"
        return shutting_down(f"the server is shutting down: this request was stopped {where} when the grace "
                             "period (--grace) ran out; send it again when the server is back")


class APIKey:
    """Plain ASGI middleware checking ``Authorization: Bearer KEY`` on the /v1 routes. (Starlette's
    ``BaseHTTPMiddleware`` would hide client disconnects from the endpoints: nothing would be cancelled.)"""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"") != self.expected:
                error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


JSON_ROUTES = ("/v1/completions", "/v1/chat/completions")


class JSONBody:
    """Plain ASGI middleware: a POST to a completion route whose ``Content-Type`` is not JSON gets a 415 that
    says so (FastAPI would answer with a validation message about a dict). No header at all is read as
    JSON, as FastAPI does."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in JSON_ROUTES:
            given = dict(scope.get("headers") or []).get(b"content-type")
            media = None if given is None else given.decode("latin-1").split(";")[0].strip().lower()
            if media is not None and media != "application/json" and not media.endswith("+json"):
                error = APIError(415, f"Content-Type {media!r} is not supported: send the request body as "
                                 "JSON with 'Content-Type: application/json' (curl: -H 'Content-Type: "
                                 "application/json')", param="Content-Type", code="unsupported_media_type")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AnswerWhenCancelled:
    """Outermost ASGI middleware: a request task the server cancels (its graceful-shutdown timeout, or the
    event loop closing on an immediate exit) still answers in OpenAI's shape: a JSON 503 if nothing was
    sent yet, an SSE error event and ``data: [DONE]`` mid-stream. uvicorn would otherwise send a plain-text
    500 and log the ``CancelledError`` as a traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "sse": False, "ended": False}

        async def tracked(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                state["sse"] = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if state["ended"]:
                return
            error = shutting_down("the server is shutting down; this request was not finished")
            try:
                if not state["started"]:
                    await error.response()(scope, receive, send)
                elif state["sse"]:
                    body = f"data: {json.dumps(error.body)}\n\ndata: [DONE]\n\n"
                    await send({"type": "http.response.body", "body": body.encode(), "more_body": False})
                # any other response cut short is left incomplete (uvicorn closes it): never passed as whole
            except Exception:  # noqa: BLE001, S110 - the connection is gone: nothing left to tell
                pass


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               max_queue: int = 16) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``."""
    worker = Worker(engine, max_queue)
    app = FastAPI(title="selfextend", lifespan=_lifespan(worker))
    app.state.worker, app.state.engine = worker, engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                        code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        message = f"{param}: {msg}" if param else msg
        return APIError(400, message, param=param, code="invalid_value").response()

    app.add_middleware(JSONBody)
    if api_key is not None:
        app.add_middleware(APIKey, key=api_key)
    app.add_middleware(AnswerWhenCancelled)  # the last added is the outermost

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "shutting_down" if worker.stopping else "ok", "model": model_name,
                "queued": worker.jobs.qsize(), "busy": worker.busy,
                "prefix_cache_mb": round(engine.prefix_cache.nbytes / 2**20, 1), "reach": engine.reach,
                "prefill_chunk": engine.prefill_chunk, "queue": worker.queue_state()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "selfextend", "max_model_len": engine.reach}]}

    def check_model(req: _Common) -> None:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: _Common, max_tokens: int | None, default: int = DEFAULT_MAX_TOKENS) -> Sampling:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop strings", param="stop")
        return Sampling(max_tokens=max_tokens or default, temperature=req.temperature,
                        top_p=req.top_p, seed=req.seed, stop=stop)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        for name, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None), ("suffix", req.suffix)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt", code="empty_prompt")
        if any(not 0 <= t < len(engine.tokenizer) for t in ids):
            raise APIError(400, f"prompt: token ids must lie in [0, {len(engine.tokenizer)})", param="prompt")
        params = sampling(req, req.max_tokens)
        return await _respond(request, req, ids, params, "text_completion", model_name)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req)
        if req.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs",
                           code="unsupported")
        messages = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
        try:
            ids = engine.chat_prompt(messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        # chat's default, as OpenAI's and vLLM's: answer until the end of text or of what the model reads
        params = sampling(req, req.max_completion_tokens or req.max_tokens, max(1, engine.reach - len(ids)))
        return await _respond(request, req, ids, params, "chat.completion", model_name)

    async def _respond(request: Request, req: _Common, ids: list[int], params: Sampling, kind: str,
                       name: str):
        try:
            engine.check_length(ids, params.max_tokens)
        except ContextLengthError as err:
            param = "messages" if kind == "chat.completion" else "prompt"
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from None
        job = Job(ids, params, asyncio.get_running_loop(), stream=req.stream)
        worker.submit(job)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(job, rid, kind, name, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        result = await _wait(job, request)
        return _body(result, rid, kind, name)

    return app


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "messages: only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _lifespan(worker: Worker):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            if not worker.stopping:  # stopped without a signal (an embedding program, tests)
                logger.info("shutting down: stopping the running request, refusing queued ones")
            worker.begin_shutdown()  # a Ctrl-C began it already: nothing is left running by now
            await worker.wait_stopped()  # within one chunk or token

    return lifespan


async def _wait(job: Job, request: Request) -> Result:
    """The job's result; a client that goes away meanwhile (or a cancelled handler) cancels it."""
    done = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_closed") from None
                continue
            if isinstance(item, APIError):
                raise item
            if isinstance(item, Result):
                done = True
                return item
    finally:
        if not done:
            job.cancelled = True


def _usage(result: Result) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _body(result: Result, rid: str, kind: str, name: str) -> dict[str, Any]:
    finish = "stop" if result.finish_reason == "stop" else "length"
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": [choice],
            "usage": _usage(result)}


async def _stream(job: Job, rid: str, kind: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, optional usage, ``[DONE]``."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            if role:
                content = {"role": "assistant", "content": ""}
            else:
                content = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, role=True)
        while True:
            item = await job.events.get()
            if isinstance(item, str):
                yield chunk(item)
            elif isinstance(item, APIError):
                yield f"data: {json.dumps(item.body)}\n\n"
                break
            elif isinstance(item, Result):
                yield chunk(None, "stop" if item.finish_reason == "stop" else "length")
                if include_usage:
                    usage = {"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                             "usage": _usage(item)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op when finished; frees the worker when the client went away
