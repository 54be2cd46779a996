"""The HTTP API: OpenAI-compatible chat completions, feedback, stats, health.

Contract relied on by other clients and by the benchmarks:
- `GET /health` -> 200 `{"status": "ok", "model_version": ...}`; 503 `"unavailable"` while the
  engine cannot answer (a vLLM being restarted)
- `POST /v1/chat/completions` (stream or not); the completion `id` is the stored response's id.
  Extensions: `conversation_id` (continue a stored conversation), `user` (the rater id).
- `POST /v1/feedback` -> 201 `{"id", "kind"}` once committed; 404 unknown ids; 422 bad input.
- `GET /v1/feedback/stats` -> rows per kind: the caller's own, or all of them for operators.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
# name types made inside the router factories (the signed-in account's role, the train request).

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

import tuneloop
from tuneloop.core.records import (
    WINNERS,
    Account,
    Comparison,
    Edit,
    Feedback,
    Message,
    Ranking,
    Rating,
    SamplingParams,
    Thumbs,
    role_allows,
)
from tuneloop.core.settings import LimitSettings
from tuneloop.feedback.validation import (
    MAX_RANKING_SIZE,
    MAX_REASON_CHARS,
    MAX_TEXT_CHARS,
    check_feedback,
)
from tuneloop.serve.asgi_body import read_body, replay
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService, ChatTurn
from tuneloop.serve.errors import error_response, install_error_handlers
from tuneloop.serve.limits import Limits, feedback_cost

MAX_BODY_BYTES = 1_000_000
# A streamed answer's tokens decoded within this many seconds of each other go out as one SSE
# event: fewer events cost the server less per token (bench/chat_streaming.py); the first text
# is never held back.
STREAM_MERGE_S = 0.01
MAX_MESSAGES = 256
# Feedback on single answers: anyone's own only. Comparisons and rankings of anyone's answers
# need the rater role (raters judge prompts they did not ask).
OWN_ANSWER_KINDS = frozenset({"thumbs", "rating", "edit"})
MAX_NEW_TOKENS = 4096


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_TEXT_CHARS)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    user: str | None = None
    conversation_id: int | None = Field(None, ge=1)

    def params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or SamplingParams.max_tokens
        return SamplingParams(max_tokens, self.temperature, self.top_p)


class _FeedbackIn(BaseModel):
    """A feedback body: its fields' JSON types and shape only. Their values are checked by
    `feedback.validation.check_feedback`, as everywhere else feedback comes in."""

    model_config = ConfigDict(extra="forbid")
    rater: str | None = Field(None, max_length=64, description="the caller's own name, if given")


class ThumbsIn(_FeedbackIn):
    kind: Literal["thumbs"]
    response_id: int
    value: int = Field(description="1 (up) or -1 (down)")

    def record(self, rater: str) -> Feedback:
        return Thumbs(self.response_id, self.value, rater)  # type: ignore[arg-type]


class RatingIn(_FeedbackIn):
    kind: Literal["rating"]
    response_id: int
    value: int = Field(description="1 to 5")
    reason: str | None = Field(None, description=f"at most {MAX_REASON_CHARS} characters")

    def record(self, rater: str) -> Feedback:
        return Rating(self.response_id, self.value, self.reason, rater)


class EditIn(_FeedbackIn):
    kind: Literal["edit"]
    response_id: int
    text: str = Field(description=f"the answer as it should read, at most {MAX_TEXT_CHARS} chars")

    def record(self, rater: str) -> Feedback:
        return Edit(self.response_id, self.text, rater)


class ComparisonIn(_FeedbackIn):
    kind: Literal["comparison"]
    response_ids: list[int] = Field(min_length=2, max_length=2)
    winner: str = Field(description=", ".join(WINNERS))

    def record(self, rater: str) -> Feedback:
        a, b = self.response_ids
        return Comparison(a, b, self.winner, rater)


class RankingIn(_FeedbackIn):
    kind: Literal["ranking"]
    response_ids: list[int] = Field(description=f"2 to {MAX_RANKING_SIZE}, best first")

    def record(self, rater: str) -> Feedback:
        return Ranking(tuple(self.response_ids), rater)


FeedbackIn = Annotated[
    ThumbsIn | RatingIn | EditIn | ComparisonIn | RankingIn, Field(discriminator="kind")
]


class FeedbackAck(BaseModel):
    id: int
    kind: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model_version: str


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"  # UTF-8, as json.dumps(ensure_ascii=False)


def _chunk(turn: ChatTurn, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": str(turn.id),
        "object": "chat.completion.chunk",
        "created": turn.created,
        "model": turn.version_id,
        "conversation_id": turn.conversation_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _usage(turn: ChatTurn) -> dict[str, int]:
    r = turn.response
    assert r is not None, "usage is known once the turn has ended"
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


async def _stream_events(turn: ChatTurn, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        # The role event goes out with the first text and the last events together: each write
        # to a client's socket costs the server ~90 us, and the request to the engine (vLLM)
        # leaves before any of them.
        head = _sse(_chunk(turn, {"role": "assistant", "content": ""}, None))
        async with aclosing(turn.astream(STREAM_MERGE_S)) as chunks:
            async for text in chunks:
                yield head + _sse(_chunk(turn, {"content": text}, None))
                head = b""
        tail = _sse(_chunk(turn, {}, turn.response.finish_reason))  # type: ignore[union-attr]
        if include_usage:
            tail += _sse(_chunk(turn, {}, None) | {"choices": [], "usage": _usage(turn)})
        yield head + tail + b"data: [DONE]\n\n"
    finally:
        turn.cancel()  # a client that went away stops the generation


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body however the response ends. When a client's disconnect cancels a response
    between two chunks, Starlette leaves the body generator suspended, and its cleanup (which
    stops the generation) would wait for the garbage collector."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


class BodySizeLimit:
    """Refuses bodies over MAX_BODY_BYTES with a 413 in OpenAI's error shape.

    A body with a Content-Length is judged by it before anything is read, at no cost to the
    request's path. A body sent without one (chunked) is read here, counted as it arrives, and
    handed on whole once it fits: every route reads its body whole anyway. Plain ASGI: the
    decorator form costs ~180 us per request and per streamed chunk (bench/feedback_ingest.py).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            message = f"request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}"
            await error_response(413, message)(scope, receive, send)
        elif b"transfer-encoding" in headers and b"content-length" not in headers:
            try:
                body = await read_body(receive, MAX_BODY_BYTES)
            except ClientDisconnect:
                return  # nobody to answer
            if body is None:
                message = f"request body is over the limit of {MAX_BODY_BYTES} bytes"
                await error_response(413, message)(scope, receive, send)
            else:
                await self.app(scope, replay(body, receive), send)
        else:
            await self.app(scope, receive, send)


def _check_named(name: str | None, account: Account) -> None:
    """A body may name its caller (`user`, `rater`), and no one else."""
    if name is not None and name != account.name:
        raise HTTPException(
            403, f"signed in as {account.name}: a request cannot speak for {name[:64]!r}"
        )


def create_api(
    service: ChatService, principals: Principals, limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits.of(LimitSettings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.engine.aclose()

    app = FastAPI(
        title="tuneloop",
        version=tuneloop.__version__,
        description="Chat, collect feedback, retrain, hot-swap.",
        lifespan=lifespan,
    )

    install_error_handlers(app)

    app.add_middleware(BodySizeLimit)

    @app.get(
        "/health",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "the engine cannot answer, or nothing is stored"}
        },
    )
    async def health() -> Any:
        # The engine cannot answer (a vLLM restarting after a crash), or nothing can be stored.
        if not service.engine.ready or not service.store.writing:
            body = Health(status="unavailable", model_version=service.version)
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ok", model_version=service.version)

    SignedIn = Annotated[Account, Depends(principals.require("user"))]  # noqa: N806

    @app.get("/v1/models")
    async def models(_: SignedIn) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": service.version, "object": "model", "owned_by": "tuneloop"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, account: SignedIn) -> Any:
        _check_named(req.user, account)
        await limits.check(limits.chat, account)
        messages = [Message(m.role, m.text()) for m in req.messages]
        # Inline, not in a worker thread: starting a turn is short CPU work that never blocks
        # (the chat template, tokenizing, ids held in memory); generation and the store's writes
        # run elsewhere. Its errors are answered by `serve.errors`.
        turn = service.chat(
            messages,
            req.params(),
            conversation_id=req.conversation_id,
            rater_id=account.name,
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return ClosingStreamingResponse(
                _stream_events(turn, include_usage), media_type="text/event-stream"
            )
        # Read on the event loop, not in a worker thread: 40 long answers would otherwise hold
        # every worker thread, and the admin routes (a rollback) would wait for them.
        try:
            async with aclosing(turn.astream()) as chunks:
                text = "".join([chunk async for chunk in chunks])
        finally:
            turn.cancel()  # a client that went away stops the generation
        await asyncio.wrap_future(turn.saved)  # type: ignore[arg-type]
        return {
            "id": str(turn.id),
            "object": "chat.completion",
            "created": turn.created,
            "model": turn.version_id,
            "conversation_id": turn.conversation_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": turn.response.finish_reason,
                }
            ],  # type: ignore[union-attr]
            "usage": _usage(turn),
        }

    @app.post(
        "/v1/feedback",
        status_code=201,
        response_model=FeedbackAck,
        responses={
            404: {"description": "unknown response id"},
            422: {"description": "invalid feedback"},
        },
    )
    async def post_feedback(body: FeedbackIn, account: SignedIn) -> Any:
        _check_named(body.rater, account)
        fb = body.record(account.name)
        check_feedback(fb)  # before its cost is charged: a bad one costs nothing
        await limits.check(limits.feedback, account, feedback_cost(fb))
        own_only = body.kind in OWN_ANSWER_KINDS or not role_allows(account.role, "rater")
        submitted = service.submit_feedback(fb, own_answers_only=own_only)
        row_id = await asyncio.wrap_future(submitted)
        return FeedbackAck(id=row_id, kind=body.kind)

    @app.get("/v1/feedback/stats")
    async def feedback_stats(account: SignedIn) -> dict[str, int]:
        # The caller's own rows; the whole store's only to operators.
        rater = None if role_allows(account.role, "operator") else account.name
        return await run_in_threadpool(service.feedback_counts, rater)

    return app
