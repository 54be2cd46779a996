"""A reference point for bench/vllm_streaming.py: the least a gateway does. It forwards
`POST /v1/chat/completions` to vLLM's Unix socket and streams the bytes back as they come: no
parsing, no storage, no ids of its own. It reads vLLM with httpx, as tuneloop did before it moved
to aiohttp (`bench/stream_client.py`), so it is no longer the cheapest path per token.

    VLLM_API_KEY=KEY python bench/passthrough_proxy.py SOCKET PORT
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def create_app(socket_path: str, api_key: str) -> Starlette:
    client = httpx.AsyncClient(
        base_url="http://vllm",
        transport=httpx.AsyncHTTPTransport(uds=socket_path),
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=None,
        limits=httpx.Limits(max_connections=None, keepalive_expiry=2.0),
    )

    async def chat(request: Request) -> StreamingResponse:
        upstream = client.build_request(
            "POST",
            "/v1/chat/completions",
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        response = await client.send(upstream, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", health),
        ]
    )


if __name__ == "__main__":
    app = create_app(sys.argv[1], os.environ["VLLM_API_KEY"])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
