"""Serving a canary: a candidate loaded in an engine of its own beside the served one, answering
a share of conversations (`ChatService.engine_for`) until the loop's human gate promotes or
rejects it (`tuneloop.loop.canary`). The engine as the loop sees it, with the canary added."""

from __future__ import annotations

import gc
from collections.abc import Callable

from tuneloop.core.records import ModelVersion
from tuneloop.serve.chat_service import CanaryRoute, ChatService
from tuneloop.serve.engine import Engine, EngineLoadError, ServedEngine


class CanaryServing(ServedEngine):
    """`ServedEngine` plus `start_canary` and `stop_canary`; `open_engine` loads a version in an
    engine of its own (it raises for an engine that cannot serve two versions at once)."""

    def __init__(
        self,
        service: ChatService,
        log: Callable[[str], None],
        open_engine: Callable[[ModelVersion], Engine],
    ) -> None:
        super().__init__(service.engine, log)
        self.service = service
        self._open_engine = open_engine

    @property
    def canary_version(self) -> str | None:
        return self.service.canary_version

    def start_canary(self, version: ModelVersion, share: float) -> None:
        """Load `version` beside the served one and send it `share` of conversations; on a
        failure to load, EngineLoadError and nothing changes."""
        self.log(f"loading canary {version.id} for {share:.0%} of conversations")
        try:
            engine = self._open_engine(version)
        except Exception as exc:
            raise EngineLoadError(f"the canary {version.id} failed to load: {exc}") from exc
        old, self.service.canary = self.service.canary, CanaryRoute(engine, share)
        if old is not None:
            old.engine.close()
        gc.collect()
        gc.freeze()  # as after a swap: the new weights' objects stay out of the collector

    def stop_canary(self) -> None:
        """Conversations go back to the served version; answers in flight on the canary end on
        it (they hold its engine)."""
        old, self.service.canary = self.service.canary, None
        if old is not None:
            self.log(f"canary {old.engine.version} stopped")
            old.engine.close()
