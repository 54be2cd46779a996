"""Routes for tuneloop's gateways (`tuneloop gateway`): more tuneloop servers in front of the
same engine, each with no store of its own. This server owns the DuckDB file; gateways send it
the answers and feedback they take, in batches, and read through it what they need. Every route
takes the gateway token (`<data-dir>/gateway.token`, which only the data dir's owner may read),
never an account's: accounts sign in at the gateways. The file is read again whenever it changes,
so `tuneloop gateway token` (`rotate_gateway_token`) replaces the token of a running server: the
old one is refused from the next request on.

- `POST /v1/gateway/writes {"ops": [...]}`: each op (`{"response": {...}, "new_conversation":
  bool}` or `{"feedback": {...}, "own_answers_only": bool}`) goes to the store as if it came
  here, feedback counted against its rater's limit here; answered once every one is committed
  or refused: `{"results": [{"id": n} | {"error": message, "status": code, "retry_after_s"?:
  n}]}`. A gateway acknowledges its clients only then, so a gateway that dies loses no
  acknowledged row.
- `POST /v1/gateway/ids {"table": "responses"|"conversations", "count": n}` -> `{"first": id}`:
  a block of ids the gateway hands out itself (a stream names its response id before it ends).
- `GET /v1/gateway/accounts`: every enabled account by the SHA-256 of its token.
- `GET /v1/gateway/limits` -> `{"chat": n}` answers a minute per account (0: none), and
  `POST /v1/gateway/limits/chat {"account": name}` -> `{"wait_s": s, "per_minute": n}`: one
  answer of the account from this server's own bucket. With the feedback counted in `writes`,
  an account's limits hold across the primary and every gateway together.
- `GET /v1/gateway/conversations/{id}/owner`, `GET /v1/gateway/served` (the version and its
  files), `GET /v1/gateway/counts?rater=NAME` (all rows without a rater).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations.

import asyncio
import hmac
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from tuneloop.core.config import DataDir
from tuneloop.core.records import Account, to_json_dict
from tuneloop.core.wire import WireError, feedback_from_wire, response_from_wire
from tuneloop.feedback.accounts import token_index
from tuneloop.feedback.registry import get_version
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.errors import STATUS_BY_ERROR, RateLimitedError, status_of
from tuneloop.serve.limits import Limits, feedback_cost

MAX_OPS = 4096


def gateway_token(data_dir: DataDir) -> str:
    """The gateway token, made at the first start (mode 0600) and kept across restarts."""
    path = data_dir.gateway_token_file
    if not path.exists():
        data_dir.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def rotate_gateway_token(data_dir: DataDir) -> Path:
    """Write a new gateway token (0600) in place of the old one, atomically; its path."""
    path = data_dir.gateway_token_file
    data_dir.root.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    os.replace(fresh, path)
    return path


class GatewayToken:
    """The gateway token as its file holds it now: read again when the file changes (another
    inode, size or modification time), so a rotation takes effect at the next request. No file,
    or an empty one, lets no one in."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def matches(self, given: str) -> bool:
        token = self.current()
        return bool(token) and hmac.compare_digest(given.strip(), token)

    def current(self) -> str:
        """The token the file holds now ("" without one)."""
        try:
            st = os.stat(self._path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            if seen != self._seen:
                self._token, self._seen = self._path.read_text().strip(), seen
        except OSError:
            self._token, self._seen = "", None
        return self._token


class WritesIn(BaseModel):
    ops: list[dict[str, Any]] = Field(max_length=MAX_OPS)


class IdsIn(BaseModel):
    table: Literal["responses", "conversations"]
    count: int = Field(ge=1, le=100_000)


class TakeIn(BaseModel):
    account: str = Field(min_length=1, max_length=256)


def create_gateway_router(
    service: ChatService, data_dir: DataDir, principals: Principals, limits: Limits
) -> APIRouter:
    gateway_token(data_dir)
    token = GatewayToken(data_dir.gateway_token_file)
    store = service.store

    async def gateway(authorization: str = Header("")) -> None:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.matches(given):
            raise HTTPException(401, "gateway routes take the gateway token")

    router = APIRouter(prefix="/v1/gateway", dependencies=[Depends(gateway)])

    def submit(op: dict[str, Any]) -> Any:
        if "response" in op:
            response = response_from_wire(op["response"])
            if op.get("new_conversation"):
                store.new_conversation_of(response.conversation_id, response.rater_id)
            return store.submit_response(response)
        if "feedback" in op:
            fb = feedback_from_wire(op["feedback"])
            # The gateway checked who sent it; its limit is counted here, with the rater's
            # feedback through every other server.
            rater = principals.by_name(fb.rater_id) or Account(fb.rater_id, "user")
            Limits.take(limits.feedback, rater, feedback_cost(fb))
            own = bool(op.get("own_answers_only"))
            return store.submit_feedback(fb, own_answers_only=own)
        raise WireError("an op is a response or a feedback")

    @router.post("/writes")
    async def writes(body: WritesIn) -> dict[str, Any]:
        results: list[dict[str, Any] | None] = [None] * len(body.ops)
        pending = []
        for i, op in enumerate(body.ops):
            try:
                pending.append((i, asyncio.wrap_future(submit(op))))
            except Exception as exc:  # noqa: BLE001 - answered per op, below
                results[i] = _refused(exc)
        for i, future in pending:
            try:
                results[i] = {"id": await future}
            except Exception as exc:  # noqa: BLE001 - answered per op
                results[i] = _refused(exc)
        return {"results": results}

    @router.post("/ids")
    async def ids(body: IdsIn) -> dict[str, int]:
        return {"first": store.lease_ids(body.table, body.count)}

    @router.get("/accounts")
    async def accounts() -> dict[str, Any]:
        index = await run_in_threadpool(token_index, store)
        return {"accounts": {sha: to_json_dict(a) for sha, a in index.items()}}

    @router.get("/limits")
    async def limit_values() -> dict[str, int]:
        return {"chat": limits.chat.per_minute}

    @router.post("/limits/chat")
    async def take_chat(body: TakeIn) -> dict[str, float]:
        return {"wait_s": limits.chat.wait_s(body.account), "per_minute": limits.chat.per_minute}

    @router.get("/conversations/{conversation_id}/owner")
    async def owner(conversation_id: int) -> dict[str, Any]:
        return {"owner": await run_in_threadpool(store.conversation_owner, conversation_id)}

    @router.get("/served")
    async def served() -> dict[str, Any]:
        version = await run_in_threadpool(get_version, store, service.version)
        path = version.artifact_path if version else None
        return {"version": service.version, "path": str(Path(path)) if path else None}

    @router.get("/counts")
    async def counts(rater: str | None = None) -> dict[str, int]:
        return await run_in_threadpool(store.feedback_counts, rater)

    return router


def _refused(exc: Exception) -> dict[str, Any]:
    known = isinstance(exc, WireError) or any(isinstance(exc, cls) for cls, _ in STATUS_BY_ERROR)
    status = 422 if isinstance(exc, WireError) else status_of(exc) if known else 500
    if isinstance(exc, RateLimitedError):
        return {"error": str(exc), "status": status, "retry_after_s": exc.retry_after_s}
    return {"error": str(exc), "status": status}
