"""A running server's loop: one training cycle at a time in a background thread, the scheduler
that starts cycles when enough new feedback arrived, and promotion and rollback, which hot-swap
what serves through `Serving` (the server's engine, see `tuneloop.serve.engine.ServedEngine`).
The API's admin routes and the Operator tab both act through here."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import (
    GateSettings,
    JobSettings,
    ScheduleSettings,
    TaskSettings,
    TrustSettings,
    check_job,
    cycle_jobs,
)
from tuneloop.feedback import registry
from tuneloop.feedback.canary import flagged_raters, human_verdict, list_canaries, running_canary
from tuneloop.feedback.runs import fail_interrupted_runs
from tuneloop.feedback.snapshot import latest_snapshot
from tuneloop.feedback.store import FEEDBACK_TABLES, FeedbackStore
from tuneloop.feedback.trust import admitted_since
from tuneloop.loop.active import score_open_tasks
from tuneloop.loop.canary import Canaries
from tuneloop.loop.pipeline import Pipeline
from tuneloop.loop.promotion import Promotion


class Serving(Protocol):
    """What the loop needs of the server: the version it serves, and a hot-swap to another
    (which raises, leaving the served version as it was, when the new one fails to load)."""

    @property
    def version(self) -> str | None: ...

    def swap(self, version: ModelVersion) -> None: ...


class BusyError(RuntimeError):
    """A cycle is already running: one job at a time."""


class LoopControl:
    def __init__(
        self,
        data_dir: DataDir,
        store: FeedbackStore,
        serving: Serving,
        *,
        schedule: ScheduleSettings | None = None,
        gate: GateSettings | None = None,
        trust: TrustSettings | None = None,
        tasks: TaskSettings | None = None,
        python: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.dd = data_dir
        self.tasks = tasks or TaskSettings()
        self.store = store
        self.serving = serving
        self.schedule = schedule or ScheduleSettings()
        self.gate = gate or GateSettings()
        self.trust = trust or TrustSettings()
        self.python = python
        self.log = log or (lambda msg: print(f"[tuneloop] {msg}", flush=True))
        self.promotion = Promotion(store, serving.swap)
        # The human gate, where the server can serve a canary beside the served version.
        self.canaries = (
            Canaries(store, serving, self.promotion, self.log)
            if hasattr(serving, "start_canary")
            else None
        )
        if self.canaries is not None:
            self.canaries.resume()
        self._cycle_lock = threading.Lock()
        self._scoring_lock = threading.Lock()
        self._stop = threading.Event()
        self._cycle: threading.Thread | None = None
        self.last_cycle: dict[str, Any] | None = None
        self._last_start = 0.0
        fail_interrupted_runs(store)
        self._scheduler = threading.Thread(target=self._schedule_loop, daemon=True)
        self._scheduler.start()

    # ---- serving versions --------------------------------------------------------------------

    def _pipeline(self, trigger: str) -> Pipeline:
        return Pipeline(
            self.dd,
            self.store,
            promotion=self.promotion,
            gate=self.gate,
            trust=self.trust,
            python=self.python,
            stop=self._stop,
            trigger=trigger,
            log=self.log,
            canaries=self.canaries,
        )

    def promote(
        self, version_id: str, reason: str = "promoted by the operator", *, force: bool = False
    ) -> ModelVersion:
        return self.promotion.promote(version_id, reason=reason, force=force)

    def rollback(self, reason: str = "rolled back by the operator") -> ModelVersion:
        return self.promotion.rollback(reason=reason)

    # ---- training cycles ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._cycle is not None and self._cycle.is_alive()

    def train_now(
        self,
        kind: str = "dpo",
        settings: JobSettings | None = None,
        trigger: str = "operator",
        **cycle: Any,
    ) -> None:
        """Start a cycle in the background; BusyError if one is running. `cycle` takes
        `Pipeline.run`'s keywords (reward_settings, retrain_reward, gate, gate_settings).
        Without `settings` (the scheduler, the Operator tab) its jobs start as the server's
        `ScheduleSettings` say (`--launcher`)."""
        check_job(kind, cycle_jobs)
        if settings is None:
            launch = self.schedule.launch()
            settings = JobSettings(launch=launch)
            cycle.setdefault("reward_settings", JobSettings(launch=launch))
        with self._cycle_lock:
            if self.busy:
                raise BusyError("a training job is already running; one at a time")
            self._last_start = time.monotonic()
            self._cycle = threading.Thread(
                target=self._run_cycle, args=(kind, settings, trigger, cycle), daemon=True
            )
            self._cycle.start()

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the running cycle (tests, `tuneloop simulate`); its summary."""
        cycle = self._cycle
        if cycle is not None:
            cycle.join(timeout)
        return self.last_cycle

    def _run_cycle(
        self, kind: str, settings: JobSettings | None, trigger: str, cycle: dict[str, Any]
    ) -> None:
        started = datetime.now(UTC).isoformat()
        summary: dict[str, Any] = {"kind": kind, "trigger": trigger, "started_at": started}
        try:
            result = self._pipeline(trigger).run(kind, settings, **cycle)
            summary |= result.to_dict() | {"status": "done"}
        except Exception as exc:  # noqa: BLE001 - the operator sees it; serving goes on
            summary |= {"status": "failed", "error": str(exc) or type(exc).__name__}
            self.log(f"training cycle failed: {summary['error']}")
            if not str(exc):
                traceback.print_exc()
        summary["finished_at"] = datetime.now(UTC).isoformat()
        self.last_cycle = summary

    # ---- the scheduler -----------------------------------------------------------------------

    def new_feedback_rows(self) -> int:
        """Feedback rows the trust policy admits, stored since the latest snapshot (all of them
        when there is none)."""
        snap = latest_snapshot(self.store)
        tables = snap.manifest["tables"] if snap else {}
        max_ids = {table: tables.get(table, {}).get("max_id") for table in FEEDBACK_TABLES.values()}
        return admitted_since(self.store, max_ids, self.trust)

    def schedule_due(self) -> bool:
        s = self.schedule
        if not s.enabled or self.busy:
            return False
        if self._last_start and time.monotonic() - self._last_start < s.every_minutes * 60:
            return False
        return self.new_feedback_rows() >= s.min_new_feedback

    def _schedule_loop(self) -> None:
        while not self._stop.wait(self.schedule.poll_seconds):
            if self.canaries is not None:
                try:
                    self.canaries.check()
                except Exception as exc:  # noqa: BLE001 - the next poll tries again
                    self.log(f"human gate: {exc}")
            if self.tasks.selection == "active" and not self.busy:
                try:
                    self.score_tasks()
                except Exception as exc:  # noqa: BLE001 - the next poll tries again
                    self.log(f"scoring rating tasks: {exc}")
            try:
                if self.schedule_due():
                    self.log("scheduler: enough new feedback, starting a training cycle")
                    self.train_now(self.schedule.kind, trigger="schedule")
            except BusyError:
                continue
            except Exception as exc:  # noqa: BLE001 - keep scheduling; say why this one failed
                self.log(f"scheduler: {exc}")

    def score_tasks(self) -> int:
        """Score the open rating tasks not yet scored by the current reward model (`loop.active`);
        how many. The scheduler does it every poll when the selection is `active`."""
        with self._scoring_lock:
            return score_open_tasks(self.store, self.dd, python=self.python, log=self.log)

    def status(self) -> dict[str, Any]:
        served = registry.promoted_version(self.store, "policy")
        return {
            "served_version": self.serving.version,
            "registry_promoted": served.id if served else None,
            "busy": self.busy,
            "last_cycle": self.last_cycle,
            "schedule": {
                "enabled": self.schedule.enabled,
                "min_new_feedback": self.schedule.min_new_feedback,
                "every_minutes": self.schedule.every_minutes,
                "kind": self.schedule.kind,
            },
            "new_feedback_rows": self.new_feedback_rows(),
            "canary": self.canary_status(),
            "flagged_canaries": self.flagged_canaries(),
        }

    def flagged_canaries(self) -> list[dict[str, Any]]:
        """Decided canaries with raters quarantined or disabled since (`flagged_raters`)."""
        found = ((c, flagged_raters(self.store, c)) for c in list_canaries(self.store))
        return [
            {"version": c.version_id, "status": c.status, "raters": raters}
            for c, raters in found
            if raters
        ]

    def canary_status(self) -> dict[str, Any] | None:
        """The running canary and what people say of it so far."""
        canary = running_canary(self.store)
        if canary is None:
            return None
        found = human_verdict(self.store, canary)
        return {
            "version": canary.version_id,
            "baseline": canary.baseline_id,
            "share": canary.share,
            "min_judgments": canary.min_judgments,
            "min_win_rate": canary.min_win_rate,
            "max_rater_share": canary.max_rater_share,
            "started_at": canary.started_at.isoformat(),
            "verdict": found.to_dict(),
        }

    def close(self) -> None:
        """Stop the scheduler and any running job (its process is terminated)."""
        self._stop.set()
        if self._cycle is not None:
            self._cycle.join(60)
