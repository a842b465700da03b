"""The OpenAI-compatible HTTP API (FastAPI) over a `Scheduler`.

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events, OpenAI's chunk format)
    GET /v1/models, GET /health, GET /metrics (Prometheus text format)

Bodies are validated by pydantic (strict types; unknown fields are ignored, as OpenAI's clients send
many): a malformed body (not JSON, not UTF-8, nested too deep, not sent as application/json), a wrong
type, a value out of range or a request that can never fit is a 400 in OpenAI's error format
{"error": {"message", "type", "param", "code"}}, as is every other 4xx; a full queue is a 429.
Prompts are encoded by the engine's encoder (`anjax.text.encode.Encoder.prompt`: `<AC>` as in training)
in a worker thread, so the event loop (and /health) never waits for it; a prompt longer than
`max_prompt_chars` (the model's positions times its longest token's characters: it cannot fit) is
refused before encoding. Chat messages go through the tokenizer's chat template first. A client that
leaves frees its slot at the next decode step (counted as cancelled), streamed or not.
finish_reason: "stop", "length" (max_tokens) or "cache_full" (the anchor cache's capacity ended it).
Extensions: `top_k` in the body, and each choice's `token_ids` (the generated ids, stop id included).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import secrets
import time
import uuid
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from anjax.serve import scheduler as sched

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # chat's default, cut to what fits the model's positions
ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}  # else invalid_request


class _Body(BaseModel):
    """What both endpoints share; OpenAI's defaults (temperature 1)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=sched.SEED_LIMIT)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _supported(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop: at most 4 non-empty strings")
        if (self.n or 1) != 1:
            raise ValueError("n: only n=1 is supported")
        unsupported = dict(
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            logprobs=self.logprobs,
        )
        if bad := [k for k, v in unsupported.items() if v not in (None, 0, False, {})]:
            raise ValueError(f"{bad[0]}: not supported by this server")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and (not self.prompt or isinstance(self.prompt[0], str)):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (a string, a list of one string, or token ids)")
        if self.echo or (self.best_of or 1) != 1 or self.suffix:
            raise ValueError("echo, best_of and suffix are not supported by this server")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error body."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM or SIGINT also starts the scheduler's drain (`Scheduler.drain`):
    after `drain_seconds` the requests still in flight end with a Failure, so every response finishes
    in order before uvicorn's own graceful-shutdown timeout would cancel it (a 500 and a traceback)."""

    def __init__(self, config: uvicorn.Config, scheduler: sched.Scheduler, drain_seconds: float):
        super().__init__(config)
        self.scheduler, self.drain_seconds = scheduler, drain_seconds

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.scheduler.drain(self.drain_seconds)
        super().handle_exit(sig, frame)


class EventStream(StreamingResponse):
    """Server-sent events that cancel their request when the response ends early (the client left)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def emit(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event) -> None:
    """Hand an event from the scheduler's thread to the request's handler (dropped once the loop has closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(events.put_nowait, event)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def max_prompt_chars(engine) -> int | None:
    """Characters beyond which a prompt cannot fit the model's positions: each token covers at most as many
    characters as the longest entry of the vocabulary (byte-level and SentencePiece pieces alike)."""
    if engine.tokenizer is None:
        return None
    return engine.cfg.max_position_embeddings * max(map(len, engine.tokenizer.get_vocab()))


def create_app(scheduler: sched.Scheduler, model_name: str) -> FastAPI:
    """The app; its lifespan starts and stops the scheduler's loop and the prompt encoder's thread."""
    engine = scheduler.engine
    encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="anjax-encode")  # one tokenizer user
    limit = max_prompt_chars(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()
        encoder.shutdown(cancel_futures=True)

    app = FastAPI(title="anjax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        kind = request.headers.get("content-type", "none")
        if where == "" and first.get("type") == "model_attributes_type" and "json" not in kind:
            return error(400, f"send the body as JSON with Content-Type: application/json (got {kind})")
        return error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if message == "There was an error parsing the body":
            message = "the body is not a JSON object (invalid JSON, not UTF-8, or nested too deep)"
        return error(exc.status_code, message)

    def too_long(chars: int, param: str) -> Response | None:
        """A 400 when `chars` characters cannot fit the model's positions (`max_prompt_chars`), else None."""
        if limit is None or chars <= limit:
            return None
        positions = engine.cfg.max_position_embeddings
        return error(400, f"{param}: {chars} characters cannot fit in the model's {positions} positions", param)

    async def encode(text: str, param: str) -> tuple[list[int], list[bool]] | Response:
        """(ids, flags) of a prompt, encoded in the encoder thread, or a 400 response."""
        if refused := too_long(len(text), param):
            return refused
        try:
            return await asyncio.get_running_loop().run_in_executor(encoder, engine.encode, text)
        except ValueError as e:
            return error(400, str(e), param)

    @app.get("/health")
    async def health():
        if scheduler.failed:
            return error(503, f"the scheduler stopped: {scheduler.failed}")
        return {"status": "ok", "slots": scheduler.n, "slots_in_use": scheduler.slots_in_use()}

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "anjax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        encoded = await encode(prompt, "prompt") if isinstance(prompt, str) else (list(prompt), [False] * len(prompt))
        if isinstance(encoded, Response):
            return encoded
        return await serve(http, body, *encoded, body.max_tokens or DEFAULT_COMPLETION_TOKENS, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        tok = engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return error(400, "the model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if refused := too_long(sum(len(m["content"]) for m in messages), "messages"):  # before the template
            return refused
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = await encode(text, "messages")
        if isinstance(encoded, Response):
            return encoded
        ids, flags = encoded
        room = engine.cfg.max_position_embeddings - len(ids)
        if not engine.spec.anchor_cache:
            room = min(room, scheduler.capacity - len(ids) + 1)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(DEFAULT_CHAT_TOKENS, room))
        return await serve(http, body, ids, flags, max_tokens, chat=True)

    async def watch(http: Request, events: asyncio.Queue, request: sched.Request) -> None:
        """Cancel `request` (freed at the scheduler's next step) the moment its client disconnects; its
        handler then gets a Failure."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        scheduler.cancel(request)
        events.put_nowait(sched.Failure("the client closed the connection", 499))

    async def next_event(events: asyncio.Queue, request: sched.Request) -> sched.Event:
        try:
            return await events.get()
        except asyncio.CancelledError:
            scheduler.cancel(request)
            raise

    async def serve(http: Request, body: _Body, ids, flags, max_tokens: int, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        temperature = 1.0 if body.temperature is None else body.temperature
        request = sched.Request(
            prompt_ids=ids,
            protected=flags,
            max_tokens=max_tokens,
            emit=lambda e: emit(loop, events, e),
            temperature=temperature,
            top_k=body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=secrets.randbelow(sched.SEED_LIMIT) if body.seed is None else body.seed,
            stop=body.stops(),
        )
        try:
            scheduler.submit(request)
        except sched.AdmissionError as e:
            return error(400, str(e))
        except sched.QueueFullError as e:
            return error(429, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = dict(id=rid, created=created, model=body.model or model_name)
        watcher = asyncio.create_task(watch(http, events, request))
        try:
            first = await next_event(events, request)
            if isinstance(first, sched.Failure):
                return error(first.status, first.message)
            if body.stream:  # from here the streaming response notices a disconnect itself
                watcher.cancel()
                usage = bool((body.stream_options or {}).get("include_usage"))
                return EventStream(stream(head, first, events, chat, usage), lambda: scheduler.cancel(request))
            text, token_ids, event = [], [], first
            while isinstance(event, sched.Delta):
                text.append(event.text)
                token_ids += event.ids
                event = await next_event(events, request)
        finally:
            watcher.cancel()
        if isinstance(event, sched.Failure):
            return error(event.status, event.message)
        choice: dict[str, Any] = dict(index=0, finish_reason=event.reason, logprobs=None, token_ids=token_ids)
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return dict(
            head,
            object="chat.completion" if chat else "text_completion",
            choices=[choice],
            usage=usage_of(event),
        )

    async def stream(head: dict, event, events: asyncio.Queue, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        first = True
        while True:
            if isinstance(event, sched.Failure):
                yield sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                return
            finish = isinstance(event, sched.Finish)
            text = "" if finish else event.text
            choice: dict[str, Any] = dict(index=0, finish_reason=event.reason if finish else None, logprobs=None)
            choice["token_ids"] = [] if finish else event.ids
            if chat:
                choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if not finish else {})
            else:
                choice["text"] = text
            yield sse(dict(head, object=kind, choices=[choice]) | ({"usage": None} if include_usage else {}))
            first = False
            if finish:
                if include_usage:
                    yield sse(dict(head, object=kind, choices=[], usage=usage_of(event)))
                yield "data: [DONE]\n\n"
                return
            event = await events.get()

    return app


def usage_of(finish: sched.Finish) -> dict:
    return dict(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )
