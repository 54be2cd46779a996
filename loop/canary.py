"""The human gate: a candidate that passed the reward model's gate is held in canary, answering
a share of conversations while raters compare it with the served version, and people decide.

The loop's scheduler thread calls `check` every poll: once the canary has `min_judgments`
judgments against its baseline, it is promoted (through the same `Promotion` as the operator's
promote: a hot-swap, then the registry) if the lower end of its win rate's 95 % interval clears
the bar, else rejected; either way conversations go back to one version. The verdict is stored
on the version's metrics beside the reward model's gate (`human_gate` beside `gate`). A server
restarted while a canary runs loads it again (`resume`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import GateSettings
from tuneloop.feedback import registry
from tuneloop.feedback.canary import (
    Canary,
    CanaryError,
    HumanVerdict,
    finish_canary,
    human_verdict,
    running_canary,
    start_canary,
)
from tuneloop.feedback.store import FeedbackStore
from tuneloop.loop.promotion import Promotion


class CanaryServing(Protocol):
    """What the human gate needs of the server (`tuneloop.serve.canary.CanaryServing`)."""

    @property
    def canary_version(self) -> str | None: ...

    def start_canary(self, version: ModelVersion, share: float) -> None: ...

    def stop_canary(self) -> None: ...


class Canaries:
    def __init__(
        self,
        store: FeedbackStore,
        serving: CanaryServing,
        promotion: Promotion,
        log: Callable[[str], None],
    ) -> None:
        self.store = store
        self.serving = serving
        self.promotion = promotion
        self.log = log
        self._lock = threading.Lock()  # one start, check or stop at a time

    def start(self, version_id: str, gate: GateSettings) -> Canary:
        """Serve `version_id` to `gate.canary_share` of conversations, judged against the
        served policy; CanaryError while another canary runs."""
        with self._lock:
            if running_canary(self.store) is not None:
                raise CanaryError("a canary is running already: one at a time")
            version = registry.require_version(self.store, version_id)
            baseline = registry.promoted_version(self.store, "policy")
            if version.kind != "policy" or baseline is None or baseline.id == version.id:
                raise CanaryError(f"{version_id} is no policy candidate to hold against another")
            if version.status == "rejected":
                raise CanaryError(f"{version_id} was rejected: {version.status_reason}")
            self.serving.start_canary(version, gate.canary_share)
            try:
                canary = start_canary(self.store, version.id, baseline.id, gate)
            except BaseException:
                self.serving.stop_canary()
                raise
        self.log(
            f"canary: {version.id} answers {gate.canary_share:.0%} of conversations until "
            f"{gate.human_judgments} human judgments against {baseline.id} decide"
        )
        return canary

    def resume(self) -> None:
        """After a restart: serve the running canary again (or end it if it cannot load)."""
        canary = running_canary(self.store)
        if canary is None or self.serving.canary_version == canary.version_id:
            return
        try:
            version = registry.require_version(self.store, canary.version_id)
            self.serving.start_canary(version, canary.share)
        except Exception as exc:  # noqa: BLE001 - the served version goes on alone
            finish_canary(self.store, canary.id, "stopped", {"error": str(exc)})
            self.log(f"canary {canary.version_id} could not be served again: {exc}")

    def check(self) -> HumanVerdict | None:
        """Decide the running canary if people have judged it enough; its verdict so far."""
        with self._lock:
            canary = running_canary(self.store)
            if canary is None:
                return None
            found = human_verdict(self.store, canary)
            if found.decision is None:
                return found
            result = found.to_dict() | {"baseline": canary.baseline_id}
            registry.update_metrics(self.store, canary.version_id, {"human_gate": result})
            share = f"{found.win_rate:.3f} [{found.lower:.3f}, {found.upper:.3f}]"
            reason = f"human gate: win rate {share} over {found.judgments} judgments"
            if found.decision == "promote":
                self.promotion.promote(canary.version_id, reason=reason)
                self.serving.stop_canary()
            else:
                self.serving.stop_canary()
                registry.reject(self.store, canary.version_id, reason)
            outcome = "promoted" if found.decision == "promote" else "rejected"
            finish_canary(self.store, canary.id, outcome, result)
        self.log(f"canary {canary.version_id}: {outcome} ({reason})")
        return found

    def stop(self, reason: str) -> Canary:
        """End the running canary without a decision: the version stays a candidate."""
        with self._lock:
            canary = running_canary(self.store)
            if canary is None:
                raise CanaryError("no canary is running")
            found = human_verdict(self.store, canary)
            self.serving.stop_canary()
            finish_canary(self.store, canary.id, "stopped", found.to_dict() | {"reason": reason})
        return canary
