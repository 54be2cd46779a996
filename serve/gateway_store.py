"""A gateway's view of the feedback store and the accounts, both kept by the primary server
(`tuneloop up`, which owns the DuckDB file; its routes are `serve.gateway_api`).

`RemoteStore` has the part of `FeedbackStore` that the chat and feedback routes use. Writes go
to the primary in batches: one writer thread sends whatever is waiting as one request, one at a
time, so a response is always written before the feedback on it; each write's future resolves
once the primary has committed it, and only then does the route acknowledge its client. Ids come
from blocks the primary leases to this gateway. `RemotePrincipals` is `Principals` over the
primary's accounts, read again every `refresh_s`: an account disabled there stops signing in
here within that time. `SharedLimiter` takes each answer of a limited account from the
primary's bucket for it; the primary counts feedback as it commits it. An account's limits hold
across the primary and every gateway together.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from starlette.concurrency import run_in_threadpool

from tuneloop.core.records import DEFAULT_RATER, Account, Feedback, Response
from tuneloop.core.wire import feedback_to_wire, response_to_wire
from tuneloop.feedback.validation import (
    FeedbackError,
    NotYoursError,
    UnknownResponseError,
    check_feedback,
)
from tuneloop.serve.auth import Principals
from tuneloop.serve.engine import EngineUnavailableError
from tuneloop.serve.errors import RateLimitedError
from tuneloop.serve.gateway_api import GatewayToken
from tuneloop.serve.limits import RateLimiter

ID_BLOCK = 256
MAX_BATCH = 1024
# A batch the primary did not receive (it restarts) is sent again for this long.
RETRY_FOR_S = 30.0
_STOP = object()
# What the primary's status for a refused write means here (`serve.errors` maps them back).
_ERROR_BY_STATUS: dict[int, type[Exception]] = {
    404: UnknownResponseError,
    403: NotYoursError,
    422: FeedbackError,
}


class StoreUnavailableError(EngineUnavailableError):
    """The primary, which keeps the store, cannot be reached: nothing was written."""


def primary_client(url: str, token_file: Path, timeout: float = 30.0) -> httpx.Client:
    """A client of the primary's gateway routes (`url` is the primary's own), signed in with
    the token `token_file` holds at each request: after `tuneloop gateway token` rewrites the
    file, a gateway goes on with the new token, unrestarted."""
    return httpx.Client(
        base_url=f"{url.rstrip('/')}/v1/gateway",
        auth=_TokenFileAuth(GatewayToken(token_file)),
        timeout=timeout,
    )


class _TokenFileAuth(httpx.Auth):
    def __init__(self, token: GatewayToken) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self._token.current()}"
        yield request


class RemoteStore:
    def __init__(self, client: httpx.Client, *, id_block: int = ID_BLOCK) -> None:
        self._client = client
        self._id_block = id_block
        self._id_lock = threading.Lock()
        self._ids: dict[str, tuple[int, int]] = {}  # table -> (next, end) of the leased block
        self._owners: dict[int, str] = {}  # conversations started here, or looked up
        self._new: set[int] = set()  # started here, first response not sent yet
        self._queue: queue.Queue[Any] = queue.Queue()
        self._reachable = True
        self._closed = False
        self._writer = threading.Thread(target=self._run_writer, name="gateway-writer", daemon=True)
        self._writer.start()

    # --- ids and conversations ---

    def _take_id(self, table: str) -> int:
        with self._id_lock:
            nxt, end = self._ids.get(table, (0, 0))
            if nxt >= end:
                first = self._call("POST", "/ids", {"table": table, "count": self._id_block})
                nxt, end = first["first"], first["first"] + self._id_block
            self._ids[table] = (nxt + 1, end)
            return nxt

    def new_response_id(self) -> int:
        return self._take_id("responses")

    def new_conversation_id(self, owner: str = DEFAULT_RATER) -> int:
        cid = self._take_id("conversations")
        self._owners[cid] = owner
        self._new.add(cid)
        return cid

    def conversation_owner(self, conversation_id: int) -> str | None:
        owner = self._owners.get(conversation_id)
        if owner is None:
            owner = self._call("GET", f"/conversations/{conversation_id}/owner")["owner"]
            if owner is not None:
                self._owners[conversation_id] = owner
        return owner

    # --- writes ---

    def submit_response(self, response: Response) -> Future:
        new = response.conversation_id in self._new
        self._new.discard(response.conversation_id)
        op = {"response": response_to_wire(response), "new_conversation": new}
        return self._enqueue(op)

    def submit_feedback(self, fb: Feedback, *, own_answers_only: bool = False) -> Future:
        check_feedback(fb)  # what it can say without the store, said here
        op = {"feedback": feedback_to_wire(fb), "own_answers_only": own_answers_only}
        return self._enqueue(op)

    def _enqueue(self, op: dict[str, Any]) -> Future:
        if self._closed:
            raise RuntimeError("the gateway's store is closed")
        future: Future = Future()
        self._queue.put((op, future))
        return future

    def _run_writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(more)
            self._send(batch)

    def _send(self, batch: list[tuple[dict[str, Any], Future]]) -> None:
        try:
            answer = self._post_batch([op for op, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every write of the batch fails with it
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, answer["results"], strict=True):
            if "id" in result:
                future.set_result(result["id"])
            else:
                future.set_exception(_error(result))

    def _post_batch(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """One request; sent again while the primary cannot be reached (it never saw it)."""
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                r = self._client.post("/writes", json={"ops": ops})
            except httpx.ConnectError as exc:
                self._reachable = False
                if time.monotonic() > deadline or self._closed:
                    raise StoreUnavailableError(f"the primary cannot be reached: {exc}") from exc
                time.sleep(0.5)
                continue
            except httpx.HTTPError as exc:
                self._reachable = False
                raise StoreUnavailableError(f"the primary failed a write: {exc}") from exc
            self._reachable = True
            if r.status_code != 200:
                raise StoreUnavailableError(f"the primary refused a write ({r.status_code})")
            return r.json()

    # --- reads ---

    def feedback_counts(self, rater: str | None = None) -> dict[str, int]:
        return self._call("GET", "/counts" if rater is None else f"/counts?rater={quote(rater)}")

    @property
    def writing(self) -> bool:
        return self._writer.is_alive() and not self._closed and self._reachable

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise StoreUnavailableError(f"the primary cannot be reached: {exc}") from exc
        if r.status_code != 200:
            raise StoreUnavailableError(f"the primary answered {r.status_code} to {path}")
        return r.json()

    def close(self) -> None:
        """Send what is waiting, then stop."""
        if self._closed:
            return
        self._queue.put(_STOP)
        self._writer.join(timeout=RETRY_FOR_S + 5)
        self._closed = True


def _error(result: dict[str, Any]) -> Exception:
    message = result.get("error", "the primary refused the write")
    if result.get("status") == 429:
        return RateLimitedError(message, int(result.get("retry_after_s", 1)))
    cls = _ERROR_BY_STATUS.get(result.get("status", 500), StoreUnavailableError)
    return cls(message)


class RemotePrincipals(Principals):
    """The primary's accounts, read again every `refresh_s` in a thread of its own."""

    def __init__(self, client: httpx.Client, refresh_s: float = 2.0) -> None:
        self._client = client
        super().__init__(self._fetch)
        self._stop = threading.Event()
        self._refresh_s = refresh_s
        threading.Thread(target=self._refresh, name="gateway-accounts", daemon=True).start()

    def _fetch(self) -> dict[str, Account]:
        r = self._client.get("/accounts")
        r.raise_for_status()
        return {sha: Account(**a) for sha, a in r.json()["accounts"].items()}

    def _refresh(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.reload()
            except (httpx.HTTPError, ValueError):
                continue  # the primary restarts: keep the accounts known

    def close(self) -> None:
        self._stop.set()


class SharedLimiter(RateLimiter):
    """The primary's limit of answers per account, taken from its bucket for the account: the
    primary and every gateway count an account's answers together (one round trip each). The
    limit itself is read again at most every `refresh_s` (a limit of 0 costs no round trip).
    While the primary cannot be reached, this gateway's own bucket holds the last limit read."""

    def __init__(self, client: httpx.Client, refresh_s: float = 2.0) -> None:
        super().__init__(0, "answers")
        self._client, self._refresh_s = client, refresh_s
        self._read_at = float("-inf")
        self._read_limit()

    def _read_limit(self) -> None:
        self._read_at = self._clock()
        # While the primary restarts, the limit known stays.
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            self.per_minute = int(self._client.get("/limits").json()["chat"])

    def _due(self) -> bool:
        return self._clock() - self._read_at > self._refresh_s

    def wait_s(self, key: str, cost: int = 1) -> float:
        """One answer of `key` from the primary's bucket (answers cost one each)."""
        if self._due():
            self._read_limit()
        if self.per_minute <= 0:
            return 0.0
        try:
            r = self._client.post("/limits/chat", json={"account": key})
            r.raise_for_status()
            taken = r.json()
            self.per_minute = int(taken["per_minute"])
            return float(taken["wait_s"])
        except (httpx.HTTPError, ValueError, KeyError):
            return super().wait_s(key, cost)

    async def wait_s_async(self, key: str, cost: int = 1) -> float:
        if self.per_minute <= 0 and not self._due():
            return 0.0
        return await run_in_threadpool(self.wait_s, key, cost)
