"""`tuneloop gateway`: one more server in front of the engine, beside the primary `tuneloop up`
that owns the feedback store. It serves the chat and feedback API (`serve.api`: the same routes,
checks and limits) on its own port; answers and feedback go to the primary's store in batches
(`serve.gateway_store`), acknowledged once committed there. No UI, no operator routes: those
stay on the primary, which also runs the training loop. Per-account limits are the primary's,
counted there for all servers together.

It serves the version the primary serves: a thread asks the primary every `follow_s` and, when
that changed, loads the new version (its files must be at the same path here: one machine, or a
shared file system), with the engine's own hot-swap. With the vLLM engine it attaches to the
same replicas as the primary (`--vllm-url`, repeated), and loads the primary's version on them
the same way (an adapter already loaded there is kept).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tuneloop.core.config import ServeConfig
from tuneloop.core.records import ModelVersion
from tuneloop.serve.api import create_api
from tuneloop.serve.chat_service import ChatService
from tuneloop.serve.engine import Engine
from tuneloop.serve.gateway_store import (
    RemotePrincipals,
    RemoteStore,
    SharedLimiter,
    primary_client,
)
from tuneloop.serve.limits import Limits, RateLimiter
from tuneloop.serve.server import guarded, log, open_engine, serve_app


@dataclass(frozen=True)
class GatewayConfig:
    primary: str  # the primary's URL
    token_file: Path  # holds the primary's gateway token; read again as it changes
    serve: ServeConfig  # host, port and engine; its data dir and limits are not used
    follow_s: float = 1.0


def served_version(client: httpx.Client) -> ModelVersion:
    """The version the primary serves, as the engine needs it: id and files."""
    served = client.get("/served").json()
    if not served.get("path"):
        raise RuntimeError(f"the primary serves {served['version']}, whose files it cannot name")
    return ModelVersion(served["version"], "policy", served["path"], served["path"])


class Follower:
    """Keeps the engine on the primary's version: asks every `every_s`, swaps on a change."""

    def __init__(self, engine: Engine, client: httpx.Client, every_s: float) -> None:
        self._engine = engine
        self._client = client
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-follow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                version = served_version(self._client)
                if version.id != self._engine.version:
                    self._engine.load(version.id, version.artifact_path)
                    log(f"serving {version.id}, as the primary does")
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                log(f"following the primary's version failed: {exc}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._every_s + 5)


def run_gateway(
    config: GatewayConfig,
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until interrupted (or `stop` is set); writes waiting for the primary are sent
    before it exits."""
    client = primary_client(config.primary, config.token_file)
    store = RemoteStore(client)
    principals = RemotePrincipals(client)
    engine = open_engine(config.serve, served_version(client))
    follower = Follower(engine, client, config.follow_s)
    try:
        service = ChatService(engine, store)  # type: ignore[arg-type] - the routes' part of it
        # The primary's limits, counted there: answers asked for as they start, feedback as the
        # primary commits it (so none here). No UI here, so no sign-in limit.
        limits = Limits(
            SharedLimiter(client),
            RateLimiter(0, "feedback rows"),
            RateLimiter(0, "sign-in attempts"),
        )
        app = guarded(create_api(service, principals, limits), config.serve.web)
        serve_app(app, config.serve.host, config.serve.port, on_ready, stop)
    finally:
        follower.close()
        principals.close()
        store.close()
        engine.close()
        client.close()
