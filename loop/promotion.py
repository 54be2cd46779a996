"""Which policy serves: promotion and rollback. The hot-swap comes first and the registry after,
under one lock, so that what serves and what the registry says change together, and a version is
never marked promoted unless it is being served. Without a swap (no server runs) only the
registry changes, and the next `tuneloop up` serves it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

Swap = Callable[[ModelVersion], None]


class Promotion:
    def __init__(self, store: FeedbackStore, swap: Swap | None = None) -> None:
        self.store = store
        self.swap = swap
        self._lock = threading.Lock()

    def promote(self, version_id: str, *, reason: str, force: bool = False) -> ModelVersion:
        """Serve `version_id` (swap first), then record it as promoted. A version the gate or a
        rollback rejected needs `force`."""
        with self._lock:
            version = registry.require_version(self.store, version_id)
            if version.status == "rejected" and not force:
                raise registry.RegistryError(
                    f"{version_id} was rejected ({version.status_reason or 'no reason given'}); "
                    "promote it with force to serve it anyway"
                )
            served = registry.promoted_version(self.store, version.kind)
            if served is not None and served.id == version_id:
                raise registry.RegistryError(f"{version_id} is already the promoted {version.kind}")
            if version.kind == "policy" and self.swap is not None:
                self.swap(version)
            registry.promote(self.store, version_id, reason=reason)
        return registry.require_version(self.store, version_id)

    def rollback(self, *, reason: str = "rolled back by the operator") -> ModelVersion:
        """Serve the policy promoted before the current one again; the current one is rejected."""
        with self._lock:
            target = registry.rollback_target(self.store, "policy")
            if self.swap is not None:
                self.swap(target)
            registry.promote(self.store, target.id, reason=reason, action="rollback")
        return registry.require_version(self.store, target.id)
