"""Reading a request's body in ASGI middleware before the app does, and handing it on: the body
limit (`serve.api`) and the sign-in limit (`serve.sessions`) both look at a body first."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect


async def read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes; ClientDisconnect if the client
    went away first."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return b"".join(parts)


def replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A `receive` that gives `body` in one message, then whatever the client sends next."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
