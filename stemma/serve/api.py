"""The OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, health, metrics, admin.

Requests are validated by pydantic at the edge; anything a client can get wrong answers 4xx with an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` and never a 500. Generation runs on
the engines' scheduler thread; each sequence reports its events to this event loop through
``call_soon_threadsafe``. A streaming client that goes away cancels its sequences, which frees their
slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..apps import render
from ..errors import StemmaError
from .config import ServeConfig
from .engine import Event, SamplingParams, Sequence
from .pool import BusyError, CapacityError, ModelNotFoundError, ModelPool, Target
from .selector import NoModelError

log = logging.getLogger("stemma.serve")

StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]  # what a torch.Generator takes


def _unicode(s: str) -> str:
    """A JSON string may hold a lone surrogate (``"\\udcff"``), which is no Unicode text: the tokenizer, the
    registry and the response encoder would all fail on it, so it is refused at the edge (400 naming the field)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError("lone_surrogate", "holds a lone surrogate ({code}) at character {at}, which is "
                                      "not Unicode text", {"code": f"U+{ord(s[e.start]):04X}", "at": e.start}) from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


def _unicode_json(value: Any) -> Any:
    """Every string (and key) in a free-form JSON value is Unicode text."""
    if isinstance(value, str):
        _unicode(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(k)
            _unicode_json(v)
    elif isinstance(value, list):
        for v in value:
            _unicode_json(v)
    return value


class _Body(BaseModel):
    """A request body: unknown fields are refused by name, as OpenAI's API does, rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- request bodies
class StreamOptions(_Body):
    include_usage: Annotated[bool, Field(strict=True)] = False


class _Common(_Body):
    """Fields shared by completions and chat completions (OpenAI names and meanings)."""

    model: Text = Field(min_length=1, max_length=400)
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(strict=True, ge=1)] = 1
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Annotated[Text, Field(min_length=1)]] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[Text, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    """Token id (as a string, OpenAI's form) -> bias added to its logit."""
    # vLLM's sampling extras, same names and ranges (OpenAI clients send them with extra_body=...)
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] = 1.0
    top_k: Annotated[int, Field(strict=True, ge=-1, le=1 << 20)] = -1
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    user: Text | None = None
    # stemma extras (OpenAI clients send them with extra_body=...)
    ignore_eos: Annotated[bool, Field(strict=True)] = False
    """Generate exactly max_tokens, past the end-of-text token (benchmarks)."""
    language: Text | None = None
    """For ``model: auto``: language code the model must serve."""
    domain: Text | None = None
    """For ``model: auto``: domain or sub-domain."""
    memory_bytes: Annotated[int, Field(strict=True, ge=1)] | None = None
    """For ``model: auto``: the served footprint must fit."""
    latency_ms: Annotated[Number, Field(gt=0)] | None = None
    """For ``model: auto``: per-token latency bound."""

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        s = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(s) > 4:
            raise BadRequest("at most 4 stop sequences are allowed", param="stop")
        if any(not x for x in s):
            raise BadRequest("stop sequences must not be empty", param="stop")
        return s

    def requirements(self) -> dict:
        return {k: v for k, v in (("language", self.language), ("domain", self.domain),
                                  ("memory_bytes", self.memory_bytes), ("latency_ms", self.latency_ms))
                if v is not None}


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None
    """The legacy form: each token's log-probability and this many alternatives."""
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = 16
    echo: Annotated[bool, Field(strict=True)] = False
    best_of: StrictInt | None = None
    suffix: Text | None = None


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are served (others are refused by name)."""

    model_config = ConfigDict(extra="ignore")

    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tool calls, refusals and the like: not used by a plain-text LM

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise BadRequest("only text content parts are supported", param="messages")
            parts.append(p.text)
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None


class AdminRequest(_Body):
    model: Text = Field(min_length=1, max_length=400)


class AggregateRequest(_Body):
    node: Text = Field(min_length=1, max_length=300)
    strategy: Text | None = None
    strategy_config: dict[str, Any] | None = None

    @field_validator("strategy_config")
    @classmethod
    def _config_is_text(cls, v):
        return _unicode_json(v)


# ---------------------------------------------------------------------- errors
class ApiError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class BadRequest(ApiError):
    pass


class Flagged(ApiError):
    """The version (or an app's node) is reached by an active risk flag: refused, as the operator has not allowed
    flagged versions (``allow_flagged``)."""

    status = 403


def _printable(s: str | None, limit: int = 300) -> str | None:
    """Text safe to send back: one line, bounded, lone surrogates (from a hostile body) escaped."""
    if s is None:
        return None
    s = " ".join(s.split())
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _printable(message, 1000), "type": type_, "param": _printable(param), "code": code}}


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


_STEMMA_ERRORS = [  # (kind, status, type, code)
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (NoModelError, 404, "invalid_request_error", "model_not_found"),
    (CapacityError, 429, "rate_limit_error", "server_busy"),
    (BusyError, 409, "invalid_request_error", "model_busy"),
]


# ---------------------------------------------------------------------- chat template
def chat_prompt(messages: list[ChatMessage]) -> str:
    """The tree's chat template: the models are plain-text LMs, so a transcript they can continue.

    ``system`` text first, then ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:``.
    Generation stops at a new ``User:`` line (added to the request's stop strings).
    """
    out = []
    for m in messages:
        text = m.text().strip()
        if m.role in ("system", "developer"):
            out.append(f"{text}\n\n")
        else:
            out.append(f"{m.role.capitalize()}: {text}\n")
    out.append("Assistant:")
    return "".join(out)


CHAT_STOP = "\nUser:"


# ---------------------------------------------------------------------- metrics
class _Metrics:
    def __init__(self, pool: ModelPool):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
        from prometheus_client.core import GaugeMetricFamily

        disable_created_metrics()  # the *_created series only add noise to every scrape

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stemma_requests", "Generation requests accepted", ["model", "endpoint"], registry=r)
        self.http = Counter("stemma_http_responses", "HTTP responses by status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("stemma_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("stemma_completion_tokens", "Tokens generated", ["model"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.latency = Histogram("stemma_request_latency_seconds", "Request latency, submit to last token",
                                 ["model"], buckets=buckets, registry=r)
        self.ttft = Histogram("stemma_time_to_first_token_seconds", "Submit to first token", ["model"],
                              buckets=buckets, registry=r)

        class EngineCollector:
            def collect(self_inner):
                stats = pool.stats()
                for name, doc, key in (("stemma_queue_depth", "Sequences waiting for a slot", "queue"),
                                       ("stemma_running_sequences", "Sequences in the batch", "running"),
                                       ("stemma_batch_size", "Rows in the last decode step", "batch"),
                                       ("stemma_adapters_loaded", "Adapters in the bank", "adapters"),
                                       ("stemma_engine_bytes", "Bytes of weights, KV cache and adapters", "bytes")):
                    g = GaugeMetricFamily(name, doc, labels=["base"])
                    for s in stats:
                        g.add_metric([s["base"]], s[key])
                    yield g

        r.register(EngineCollector())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------- what a request needs, before it runs
async def resolve(pool: ModelPool, model: str, requirements: dict | None = None) -> Target:
    """The target a model name means (with ``auto``'s requirements); unknown names raise ModelNotFoundError.

    The common case (name resolved recently) touches no disk or database: it is answered on the event loop, so a
    burst of requests reaches the scheduler together and starts in one batch.
    """
    return pool.resolve_cached(model, requirements) or await run_in_threadpool(pool.resolve, model, requirements)


_MODEL_BODIES: dict[str, type[_Body]] = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
                                         "/admin/load": AdminRequest, "/admin/unload": AdminRequest}
"""The endpoints whose body names a model, and that body's shape."""


async def base_of(pool: ModelPool, path: str, raw: bytes) -> str | None:
    """The base version a request to ``path`` with body ``raw`` runs on, or None: no model in the body, or a body
    or name the endpoint will refuse (it answers that itself). Replicas on Ray Serve are chosen by it."""
    kind = _MODEL_BODIES.get(path)
    if kind is None:
        return None
    try:
        body = kind.model_validate_json(raw)
        reqs = body.requirements() if isinstance(body, _Common) else None
        return (await resolve(pool, body.model, reqs)).base_id
    except (ValueError, StemmaError):  # pydantic's ValidationError is a ValueError
        return None


def body_limit(cfg: ServeConfig, path: str) -> int | None:
    """The largest body a request to ``path`` may send (413 beyond), or None: update files are large."""
    return None if path == "/admin/updates" else cfg.max_body_bytes


# ---------------------------------------------------------------------- the app
def create_app(ws, cfg: ServeConfig | None = None) -> FastAPI:
    """The server for a workspace. The pool (engines + scheduler thread) lives as long as the app."""
    cfg = cfg or ServeConfig.from_env()
    pool = ModelPool(ws, cfg)
    metrics = _Metrics(pool)

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = FastAPI(title="stemma", lifespan=lifespan)
    app.state.pool = pool
    app.state.cfg = cfg

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        # A value no member of a union takes fails once per member; the member's own complaint (a lone surrogate,
        # a bound) says more than "should be a valid list".
        e = next((x for x in errs if x.get("type") not in ("list_type", "int_type", "string_type", "dict_type",
                                                              "model_type")), errs[0] if errs else {})
        if e.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_request_error")
        # The path into the body, without pydantic's union member tags ("function-after[...]", "list[int]", "str").
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not (isinstance(x, str) and _TAG.match(x))]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        return _error(400, f"{where}: {msg}", "invalid_request_error", param)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StemmaError)
    async def _stemma_error(request: Request, exc: StemmaError):
        for kind, status, type_, code in _STEMMA_ERRORS:
            if isinstance(exc, kind):
                return _error(status, str(exc), type_, "model" if status == 404 else None, code)
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    class Guard:
        """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints): counts
        responses, refuses bodies beyond ``max_body_bytes`` (413) and answers a bug with a 500 body itself.

        A bug must not reach uvicorn: it would close the keep-alive connection, failing the client's next request
        too. Only a bug after the response started (mid-stream) still ends its connection: nothing else can tell
        the client the response is incomplete.
        """

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            started = False

            async def counting_send(message):
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    route = scope.get("route")
                    metrics.http.labels(getattr(route, "path", "other"), str(message["status"])).inc()
                await send(message)

            raw_receive = receive
            limit = body_limit(cfg, scope["path"])
            if limit is not None:
                length = dict(scope["headers"]).get(b"content-length", b"0")
                if not length.isdigit() or int(length) > limit:
                    return await self._too_large(scope, raw_receive, counting_send, limit, drain=True)
                receive = self._bounded(receive, limit)
            try:
                await self.app(scope, receive, counting_send)
            except _BodyTooLarge as e:
                if started:
                    raise
                await self._too_large(scope, raw_receive, counting_send, limit, drain=e.more)
            except Exception:
                if started:
                    raise
                log.exception("unhandled error on %s", scope["path"])
                await _error(500, "internal server error", "server_error")(scope, receive, counting_send)

        @staticmethod
        def _bounded(receive, limit: int):
            seen = 0

            async def bounded():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(message.get("more_body", False))
                return message

            return bounded

        @staticmethod
        async def _too_large(scope, receive, send, limit: int, drain: bool):
            """413, after reading the rest of the body (``drain``: some is left), since a body left unread would end
            the keep-alive connection."""
            more = drain
            while more:
                message = await receive()
                more = message["type"] == "http.request" and message.get("more_body", False)
            await _error(413, f"the request body is larger than {limit} bytes", "invalid_request_error",
                         code="request_too_large")(scope, receive, send)

    app.add_middleware(Guard)

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "engines": pool.stats()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await run_in_threadpool(pool.models)}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        t = await run_in_threadpool(pool.resolve, model)
        listed = await run_in_threadpool(pool.models)
        for m in listed:
            if m["id"] == model:
                return m
        for m in listed:
            if m["version"] == t.version_id and not m.get("app"):
                return m
        return {"id": model, "object": "model", "owned_by": "stemma", "root": t.base_node, "parent": t.parent_node,
                "relation": t.relation, "layer": t.layer, "version": t.version_id, "max_model_len": t.context}

    # ------------------------------------------------------------------ admin
    def _admin(request: Request) -> None:
        if not cfg.admin_token:
            raise _Forbidden("admin endpoints are disabled: start the server with STEMMA_ADMIN_TOKEN set")
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.admin_token.encode()):
            raise _Unauthorized("missing or wrong admin bearer token")

    @app.post("/admin/load")
    async def admin_load(body: AdminRequest, request: Request):
        _admin(request)
        t = await run_in_threadpool(pool.resolve, body.model)
        return await run_in_threadpool(pool.load, t)

    @app.post("/admin/unload")
    async def admin_unload(body: AdminRequest, request: Request):
        _admin(request)
        t = await run_in_threadpool(pool.resolve, body.model)
        return await run_in_threadpool(pool.unload, t)

    @app.post("/admin/updates")
    async def admin_submit_update(request: Request):
        """A signed update file as the request body: verified like `stemma update submit`, or refused (400)."""
        from ..update import service as updates

        _admin(request)
        raw = await request.body()
        if not raw:
            raise BadRequest("the body must be a signed update file (application/octet-stream)")
        row = await run_in_threadpool(updates.submit, pool.ws, raw, "request body")
        return {"id": row.id, "node": row.node_path, "parent": row.parent_id, "status": row.status}

    @app.post("/admin/aggregate")
    async def admin_aggregate(body: AggregateRequest, request: Request):
        """One round over a node's pending updates, judged by its gate; an accepted version is served at once."""
        from ..update import service as updates

        _admin(request)
        res = await run_in_threadpool(updates.aggregate, pool.ws, body.node, None, body.strategy,
                                      body.strategy_config)
        if res.version is not None:
            pool.forget_names()
        r = res.round
        return {"round": r.id, "node": r.node_path, "parent": r.parent_id, "strategy": r.strategy,
                "accepted": r.accepted, "reasons": r.reasons, "selected": r.selected,
                "version": res.version.id if res.version else None}

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.echo or body.suffix or (body.best_of not in (None, 1)):
            raise BadRequest("echo, suffix and best_of are not supported")
        t, engine = await _prepare(body)
        prompts = _prompt_ids(body.prompt if t.template is None else _app_prompt(t, body.prompt), engine)
        return await _generate(request, body, t, engine, prompts, chat=False, endpoint="completions",
                               max_tokens=body.max_tokens, extra_stop=())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        t, engine = await _prepare(body)
        text = chat_prompt(body.messages if t.template is None else _app_messages(t, body.messages))
        prompts = [engine.tokenizer.encode(text).ids]
        return await _generate(request, body, t, engine, prompts, chat=True, endpoint="chat",
                               max_tokens=body.max_completion_tokens or body.max_tokens, extra_stop=(CHAT_STOP,))

    async def _prepare(body: _Common):
        if body.n > cfg.max_n:
            raise BadRequest(f"n is {body.n}; at most {cfg.max_n} choices per request", param="n")
        if isinstance(body, ChatRequest) and body.top_logprobs and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        reqs = body.requirements()
        if reqs and body.model != "auto":
            raise BadRequest("language/domain/memory_bytes/latency_ms apply to model 'auto' only", param="model")
        t = await _unflagged(await resolve(pool, body.model, reqs))
        engine = pool.engines.get(t.base_id) or await run_in_threadpool(pool.engine, t)
        return t, engine

    async def _unflagged(t: Target) -> Target:
        """The target, unless a risk flag reaches its version (a recently resolved name included): refused (403,
        code ``flagged``). A choice of ``auto`` never is: the pool chooses again when a flag reaches its recent
        choice (`ModelPool.resolve`)."""
        if cfg.allow_flagged:
            return t
        flags = pool.flags_cached()
        if flags is None:
            flags = await run_in_threadpool(pool.flags)
        refusal = pool.refusal(t, flags)
        if refusal:
            raise Flagged(refusal, param="model", code="flagged")
        return t

    def _app_prompt(t: Target, prompt):
        """A completion's prompt(s) put into the app's template; apps take text, not token ids."""
        items = [prompt] if isinstance(prompt, str) else list(prompt)
        if not items or not all(isinstance(x, str) for x in items):
            raise BadRequest(f"app:{t.app} takes text prompts (they go into its template), not token ids",
                             param="prompt")
        return [render(t.template, x) for x in items]

    def _app_messages(t: Target, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The chat with its last user message put into the app's template."""
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
        if last is None:
            raise BadRequest(f"app:{t.app} needs a user message to put into its template", param="messages")
        out = list(messages)
        out[last] = ChatMessage(role="user", content=render(t.template, messages[last].text()))
        return out

    def _prompt_ids(prompt, engine) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise BadRequest("prompt is empty", param="prompt")
        if len(items) > cfg.max_prompts:
            raise BadRequest(f"{len(items)} prompts; at most {cfg.max_prompts} per request", param="prompt")
        vocab = engine.decoder.shape.vocab_size
        out = []
        for it in items:
            if isinstance(it, str):
                ids = engine.tokenizer.encode(it).ids
            else:
                if any(not 0 <= x < vocab for x in it):
                    raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids = list(it)
            out.append(ids or [engine.eos_id])  # an empty prompt starts from end-of-text, as GPT-2 does
        return out

    async def _generate(request: Request, body: _Common, t: Target, engine, prompts: list[list[int]], *, chat: bool,
                        endpoint: str, max_tokens: int | None, extra_stop: tuple[str, ...]):
        ctx = engine.context
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise BadRequest(f"the prompt is {longest} tokens; {t.node} has a context of {ctx} tokens and needs "
                             "room for at least one new token", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and longest + max_tokens > ctx:
            raise BadRequest(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                             f"of {t.node} ({ctx} tokens)", param="max_tokens", code="context_length_exceeded")
        stop = body.stops() + extra_stop
        bias = _logit_bias(body, engine)
        want = (body.top_logprobs or 0 if body.logprobs else None) if chat else body.logprobs
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        seqs: list[Sequence] = []
        for p in prompts:
            for j in range(body.n):
                params = SamplingParams(
                    max_tokens=max_tokens if max_tokens is not None else ctx - len(p), temperature=body.temperature,
                    top_p=body.top_p, seed=None if body.seed is None else body.seed + j, stop=stop,
                    ignore_eos=body.ignore_eos, top_k=max(body.top_k, 0), min_p=body.min_p,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    repetition_penalty=body.repetition_penalty, logit_bias=bias, logprobs=want)
                i = len(seqs)

                def sink(ev: Event, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

                seqs.append(Sequence(prompt=p, params=params, adapter=t.adapters, sink=sink, label=t.node,
                                     stream=body.stream))
        if t.base_id in pool.engines:
            pool.submit(t, seqs)  # a lock and an append
        else:  # evicted since _prepare: loading again reads the store, off the event loop
            await run_in_threadpool(pool.submit, t, seqs)
        metrics.requests.labels(t.node, endpoint).inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model_name = t.node if body.model == "auto" else body.model
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(seqs, queue, t, rid, created, model_name, chat, include_usage,
                                             engine if want is not None else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts = [""] * len(seqs)
            lps: list[list] = [[] for _ in seqs]
            finals: list[Event | None] = [None] * len(seqs)
            while any(f is None for f in finals):
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():  # nobody to answer: free the slots now
                        return Response(status_code=499)
                    continue
                texts[i] += ev.text
                lps[i] += ev.logprobs
                if ev.done:
                    finals[i] = ev
                    _observe(t, seqs[i], ev)
        finally:
            for s in seqs:
                s.cancel()
        failed = next((f for f in finals if f.error), None)
        if failed:
            return _error(500, f"generation failed: {failed.error}", "server_error")
        prompt_tokens = sum(len(p) for p in prompts)  # each prompt counted once, as OpenAI does for n > 1
        completion_tokens = sum(f.completion_tokens for f in finals)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": None if want is None else _logprobs_doc(engine, lps[i], chat),
                        "finish_reason": finals[i].finish_reason} for i in range(len(seqs))]
        else:
            choices = [{"index": i, "text": texts[i],
                        "logprobs": None if want is None else _logprobs_doc(engine, lps[i], chat),
                        "finish_reason": finals[i].finish_reason} for i in range(len(seqs))]
        doc = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": model_name, "system_fingerprint": t.version_id[:12], "choices": choices,
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}
        if t.reason:
            doc["selection"] = {"model": t.node, "version": t.version_id, "reason": t.reason}
        return doc

    def _logit_bias(body: _Common, engine) -> tuple[tuple[int, float], ...]:
        if not body.logit_bias:
            return ()
        vocab = engine.decoder.shape.vocab_size
        out = []
        for k, v in body.logit_bias.items():
            if not (k.isascii() and k.strip().lstrip("-").isdigit()) or not 0 <= int(k) < vocab:
                raise BadRequest(f"logit_bias keys must be token ids in [0, {vocab}), not {k[:40]!r}",
                                 param="logit_bias")
            out.append((int(k), float(v)))
        if len(out) > 300:
            raise BadRequest("logit_bias holds at most 300 tokens", param="logit_bias")
        return tuple(out)

    def _observe(t: Target, s: Sequence, ev: Event) -> None:
        now = time.perf_counter()
        metrics.prompt_tokens.labels(t.node).inc(ev.prompt_tokens)
        metrics.completion_tokens.labels(t.node).inc(ev.completion_tokens)
        metrics.latency.labels(t.node).observe(now - s.t_submit)
        if s.t_first is not None:
            metrics.ttft.labels(t.node).observe(s.t_first - s.t_submit)

    async def _stream(seqs, queue, t: Target, rid, created, model_name, chat, include_usage,
                      lp_engine=None) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        fp = t.version_id[:12]

        def chunk(choices, usage=None) -> str:
            doc = {"id": rid, "object": obj, "created": created, "model": model_name, "system_fingerprint": fp,
                   "choices": choices}
            if include_usage:
                doc["usage"] = usage
            return f"data: {json.dumps(doc)}\n\n"

        offsets = [0] * len(seqs)

        def choice(i, text, finish, entries=()):
            lp = None
            if lp_engine is not None and entries:
                lp = _logprobs_doc(lp_engine, list(entries), chat, offsets[i])
                if not chat:
                    offsets[i] += sum(map(len, lp["tokens"]))
            if chat:
                return {"index": i, "delta": {"content": text} if text or finish is None else {}, "logprobs": lp,
                        "finish_reason": finish}
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        try:
            if chat:
                for i in range(len(seqs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            done, completion_tokens = 0, 0
            prompt_tokens = sum(len(p) for p in {id(s.prompt): s.prompt for s in seqs}.values())
            while done < len(seqs):
                i, ev = await queue.get()
                if ev.error:
                    yield f"data: {json.dumps(error_body(f'generation failed: {ev.error}', 'server_error'))}\n\n"
                    done += 1
                    continue
                if ev.text or ev.logprobs:
                    yield chunk([choice(i, ev.text, None, ev.logprobs)])
                if ev.done:
                    done += 1
                    completion_tokens += ev.completion_tokens
                    _observe(t, seqs[i], ev)
                    yield chunk([choice(i, "", ev.finish_reason)])
            if include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            # Normal end, client gone (the response is cancelled) or server shutting down: free the slots.
            for s in seqs:
                s.cancel()

    from ..ui.routes import mount

    mount(app, ws, pool)  # the dashboard at /, reading the same registry; its playground calls the API above
    return app


_TAG = re.compile(r"^(?:str|int|float|bool|none|.*[\[(].*)$")


class _BodyTooLarge(Exception):
    def __init__(self, more: bool):
        super().__init__("request body too large")
        self.more = more  # is some of the body still unread?


def _logprobs_doc(engine, entries: list, chat: bool, offset: int = 0) -> dict:
    """Log-probabilities in OpenAI's shapes: chat's ``content`` list, or the completions' legacy columns (whose
    ``top_logprobs`` also hold the chosen token, as vLLM's do)."""
    def text(i: int) -> str:
        return engine.tokenizer.decode([i], skip_special_tokens=False)

    if chat:
        return {"content": [{"token": text(e.token), "logprob": e.logprob, "bytes": list(text(e.token).encode()),
                             "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(text(t).encode())}
                                              for t, v in e.top]} for e in entries]}
    tokens = [text(e.token) for e in entries]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{text(t): v for t, v in e.top}, tokens[j]: e.logprob} for j, e in enumerate(entries)],
            "text_offset": offsets}


class _Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class _Forbidden(ApiError):
    status = 403
    type = "permission_error"
