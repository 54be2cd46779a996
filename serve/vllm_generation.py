"""One answer streamed from a vLLM server (`VllmEngine`'s), read in a thread or on an event loop.

It holds a lease on the engine's route for the version it was made for (the engine counts the
answers in flight on each route, which a swap drains), and gives it back when it ends, however
it ends. A server that goes away mid-answer is a `ReplicaLostError`: another replica serving the
same version can take the answer over (`serve.vllm_replicas`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import orjson

from tuneloop.serve.engine import EngineUnavailableError

if TYPE_CHECKING:
    from tuneloop.serve.vllm_engine import VllmEngine, _Route

_NOT_SENT = (httpx.RemoteProtocolError, httpx.ConnectError)
_NOT_SENT_AIOHTTP = (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectorError)
_JSON = {"Content-Type": "application/json"}


class ReplicaLostError(EngineUnavailableError):
    """The vLLM server went away (or was not ready) before an answer ended: another replica
    serving the same version can take the answer over (`serve.vllm_replicas`)."""


class VllmGeneration:
    """One answer streamed from vLLM; iterate it (in a thread) or `achunks()` (on an event
    loop), once. Every chunk that arrived in one read of the socket comes out as one."""

    def __init__(
        self, engine: VllmEngine, route: _Route, body: dict[str, Any], prompt_tokens: int
    ) -> None:
        self.version_id = route.version_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.prefix_tokens = 0  # of the answer's start it continues (`VllmEngine.stream_on`)
        self.finish_reason = "stop"
        self._engine = engine
        self._route = route
        self._body = body
        self._done = False  # the route's lease is given back
        self._reading = False
        self._cancelled = False
        self._complete = False  # vLLM said [DONE]

    def _end(self) -> None:
        with self._engine._cond:
            if self._done:
                return
            self._done = True
        self._engine._release(self._route)

    def _start(self) -> bool:
        """Mark the stream as read; False if it was cancelled before that."""
        self._reading = True
        if self._cancelled:
            self._end()
        return not self._cancelled

    def __iter__(self) -> Iterator[str]:
        if not self._start():
            return
        try:
            self._engine._wait_until_servable(self._route)
            r = self._send()
            try:
                if r.status_code != 200:
                    raise _refused(r.status_code, r.read())
                for line in r.iter_lines():
                    if self._cancelled:
                        return
                    text = self._event(line)
                    if text:
                        yield text
            finally:
                r.close()
            self._check_complete()
        except httpx.HTTPError as exc:
            raise ReplicaLostError(f"the vLLM server failed mid-answer: {exc}") from exc
        finally:
            self._end()

    async def achunks(self, merge_s: float = 0.0) -> AsyncIterator[str]:
        if not self._start():
            return
        try:
            route, server = self._route, self._engine._server
            if not route.ready.is_set() or route.failed or not server.wait_ready(0):
                await asyncio.to_thread(self._engine._wait_until_servable, route)
            r = await self._asend()
            try:
                if r.status != 200:
                    raise _refused(r.status, await r.read())
                pending = b""
                async for data in r.content.iter_any():
                    pending += data
                    *events, pending = pending.split(b"\n\n")
                    text = "".join(self._event(e) for e in events)
                    if text:
                        yield text
                    if self._cancelled:
                        return
                if pending.strip():
                    self._event(pending.strip())  # a last event with no blank line after it
            finally:
                if r.content.at_eof():
                    r.release()  # the connection goes back to the pool
                else:
                    r.close()  # an answer left unread: vLLM aborts it when its socket closes
            self._check_complete()
        except aiohttp.ClientError as exc:
            raise ReplicaLostError(f"the vLLM server failed mid-answer: {exc}") from exc
        finally:
            self._end()

    # A pooled connection that vLLM closed as idle just as it was reused fails before any answer
    # came back; the request never reached vLLM, so it is sent again, once, on a new connection.
    def _send(self) -> httpx.Response:
        client = self._engine._client
        request = client.build_request("POST", "/v1/chat/completions", json=self._body)
        try:
            return client.send(request, stream=True)
        except _NOT_SENT:
            return client.send(request, stream=True)

    async def _asend(self) -> aiohttp.ClientResponse:
        session = self._engine._session()
        url, body = self._engine._chat_url, orjson.dumps(self._body)
        try:
            return await session.post(url, data=body, headers=_JSON)
        except _NOT_SENT_AIOHTTP:
            return await session.post(url, data=body, headers=_JSON)

    def _check_complete(self) -> None:
        """A stream that ended without vLLM's [DONE] lost its server mid-answer."""
        if not self._complete and not self._cancelled:
            raise ReplicaLostError("the vLLM server closed the stream mid-answer")

    def _event(self, line: str | bytes) -> str:
        """The text of one SSE event (`data: {...}`); usage and finish reason are kept."""
        if line[:6] not in ("data: ", b"data: "):
            return ""
        if line[6:12] in ("[DONE]", b"[DONE]"):
            self._complete = True
            return ""
        payload = orjson.loads(line[6:])
        if "error" in payload:
            raise EngineUnavailableError(f"vLLM: {payload['error'].get('message')}")
        usage = payload.get("usage")
        if usage:
            self.prompt_tokens = usage["prompt_tokens"]
            self.completion_tokens = usage["completion_tokens"]
        choices = payload.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return choice.get("delta", {}).get("content") or ""

    def cancel(self) -> None:
        """Stop reading; closing the stream makes vLLM abort the request."""
        self._cancelled = True
        if not self._reading:
            self._end()


def _refused(status: int, body: bytes) -> Exception:
    message = body.decode(errors="replace")[:500]
    return EngineUnavailableError(f"vLLM refused the request ({status}): {message}")
