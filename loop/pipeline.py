"""One training cycle, from the feedback store to a promoted (or rejected) model version:

    snapshot -> datasets -> reward model -> policy job (DPO | KTO | SFT | RL) -> gate -> promote

Every job runs as a process of its own (`tuneloop.loop.job_runner`); this module only decides
what runs, records it (training-run rows, model versions with their provenance) and, when the
gate passes, promotes through `swap`: the serving process loads the new weights first, so a
version is never marked promoted unless it is being served. The CLI, the server's "train now"
and its scheduler, and `tuneloop simulate` all run cycles through here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.core.artifacts import add_manifest_metrics, base_model_path, is_adapter
from tuneloop.core.config import DataDir
from tuneloop.core.job_spec import GateSpec, JobSpec
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import (
    AUTO_JOB,
    JOB_KINDS,
    GateSettings,
    JobSettings,
    LaunchSettings,
    TrustSettings,
    check_job,
    cycle_jobs,
    policy_jobs,
)
from tuneloop.feedback import registry
from tuneloop.feedback.canary import CanaryError
from tuneloop.feedback.datasets import build_datasets
from tuneloop.feedback.raters import apply_trust
from tuneloop.feedback.runs import finish_run, start_run
from tuneloop.feedback.snapshot import Snapshot, create_snapshot
from tuneloop.feedback.store import FEEDBACK_TABLES, FeedbackStore
from tuneloop.loop.canary import Canaries
from tuneloop.loop.job_choice import NoJobError, choose_policy_job
from tuneloop.loop.job_runner import JobFailed, JobProcess, job_command, run_job
from tuneloop.loop.promotion import Promotion


class NothingToTrainError(ValueError):
    """The snapshot holds no rows a job could learn from."""


@dataclass
class CycleResult:
    """What a cycle did; `promoted` says whether the candidate now serves."""

    snapshot_id: str
    reward: ModelVersion | None = None
    candidate: ModelVersion | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    canary: bool = False  # held in canary for the human gate
    reason: str = ""
    job_choice: dict[str, str] | None = None  # the policy job `auto` chose, and why

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "reward_version": self.reward.id if self.reward else None,
            "candidate_version": self.candidate.id if self.candidate else None,
            "gate": self.gate,
            "promoted": self.promoted,
            "canary": self.canary,
            "reason": self.reason,
            "job_choice": self.job_choice,
        }


class Pipeline:
    """Runs cycles on one data dir, one job at a time (callers serialize; see loop.control).

    A candidate that passes the gate is promoted through `promotion`, which a running server
    makes with its hot-swap (and shares with the operator's promote and rollback); by default
    the registry alone changes, and the next `tuneloop up` serves it."""

    def __init__(
        self,
        data_dir: DataDir,
        store: FeedbackStore,
        *,
        promotion: Promotion | None = None,
        gate: GateSettings | None = None,
        trust: TrustSettings | None = None,
        python: str | None = None,
        stop: threading.Event | None = None,
        trigger: str = "operator",
        log: Callable[[str], None] | None = None,
        canaries: Canaries | None = None,
    ) -> None:
        self.dd = data_dir
        self.canaries = canaries
        self.store = store
        self.promotion = promotion or Promotion(store)
        self.gate_settings = gate or GateSettings()
        self.trust = trust or TrustSettings()
        self.python = python
        self.stop = stop
        self.trigger = trigger
        self.log = log or (lambda _msg: None)

    # ---- the cycle ---------------------------------------------------------------------------

    def run(
        self,
        kind: str = "dpo",
        settings: JobSettings | None = None,
        *,
        reward_settings: JobSettings | None = None,
        retrain_reward: bool = True,
        gate: bool = True,
        gate_settings: GateSettings | None = None,
    ) -> CycleResult:
        """Snapshot, then train `kind`. A policy job is gated against the served policy and
        promoted if it passes. The reward model the gate (and RL) scores with is retrained on
        the same snapshot first when `retrain_reward`, or when there is none yet.
        `gate_settings` replaces the pipeline's for this cycle. `kind` `auto` trains the policy
        job the snapshot's data calls for (`loop.job_choice`)."""
        check_job(kind, cycle_jobs)
        settings = settings or JobSettings()
        self._served_policy()  # fail before snapshotting when nothing is served yet
        snapshot, datasets_dir, rows = self.snapshot()
        result = CycleResult(snapshot.id)
        if kind == AUTO_JOB:
            try:
                kind, why = choose_policy_job(rows)
            except NoJobError as exc:
                raise NothingToTrainError(str(exc)) from exc
            result.job_choice = {"kind": kind, "reason": why}
            self.log(f"job chosen from the data: {why}")
        if not JOB_KINDS[kind].policy:  # the reward model alone
            result.reward = self.train_reward(snapshot, datasets_dir, settings)
            result.promoted, result.reason = True, "newest reward model"
            return result
        reward = registry.promoted_version(self.store, "reward")
        if retrain_reward or reward is None:
            reward = self.train_reward(snapshot, datasets_dir, reward_settings or JobSettings())
        result.reward = reward
        candidate = self.train_policy(kind, snapshot, datasets_dir, settings, reward)
        if result.job_choice is not None:
            registry.update_metrics(self.store, candidate.id, {"job_choice": result.job_choice})
        result.candidate = candidate
        if not gate:
            result.reason = "not gated: left as a candidate"
            return result
        gate_settings = gate_settings or self.gate_settings
        result.gate = self.run_gate(candidate, reward, datasets_dir, gate_settings)
        result.reason = result.gate["reason"]
        if result.gate["promote"] and gate_settings.human:
            result.canary, result.reason = self._hold_in_canary(candidate, gate_settings)
        elif result.gate["promote"]:
            self.promotion.promote(candidate.id, reason=f"gate: {result.reason}")
            result.promoted = True
        else:
            registry.reject(self.store, candidate.id, f"gate: {result.reason}")
        result.candidate = registry.get_version(self.store, candidate.id)
        return result

    def snapshot(self) -> tuple[Snapshot, Path, dict[str, int]]:
        """A new snapshot, its datasets' folder, and their training rows by dataset. The raters
        are weighed first, and those whose trust fell too low quarantined (`apply_trust`): their
        judgments stay out of this snapshot, the others' count by their weight."""
        held = apply_trust(self.store, self.trust).quarantined
        if held:
            self.log(f"quarantined for a low trust weight: {', '.join(held)}")
        snapshot = create_snapshot(self.store, self.dd.snapshots, self.trust)
        built = build_datasets(snapshot.path)
        rows = {name: files.train_rows for name, files in built.items()}
        self.log(f"snapshot {snapshot.id}: train rows {rows}")
        return snapshot, next(iter(built.values())).train.parent, rows

    # ---- jobs --------------------------------------------------------------------------------

    def train_reward(
        self, snapshot: Snapshot, datasets_dir: Path, settings: JobSettings
    ) -> ModelVersion:
        policy = self._served_policy()
        version = self._run_training(
            "rm",
            snapshot,
            datasets_dir,
            settings,
            parent=None,
            base=base_model_path(policy.artifact_path),
        )
        registry.promote(self.store, version.id, reason="newest reward model")
        return registry.get_version(self.store, version.id)  # type: ignore[return-value]

    def train_policy(
        self,
        kind: str,
        snapshot: Snapshot,
        datasets_dir: Path,
        settings: JobSettings,
        reward: ModelVersion | None,
    ) -> ModelVersion:
        check_job(kind, policy_jobs)
        parent = self._served_policy()
        reward_model = None
        if JOB_KINDS[kind].scored:
            if reward is None:
                raise NothingToTrainError(f"{kind} needs a reward model: train one first (`rm`)")
            reward_model = Path(reward.artifact_path)
        return self._run_training(
            kind,
            snapshot,
            datasets_dir,
            settings,
            parent=parent,
            base=base_model_path(parent.artifact_path),
            reward_model=reward_model,
        )

    def _run_training(
        self,
        job: str,
        snapshot: Snapshot,
        datasets_dir: Path,
        settings: JobSettings,
        *,
        parent: ModelVersion | None,
        base: str,
        reward_model: Path | None = None,
    ) -> ModelVersion:
        version_kind = "reward" if job == "rm" else "policy"
        version_id = registry.next_version_id(self.store, version_kind)
        out = self.dd.models / version_id
        run = start_run(
            self.store,
            job,
            snapshot_id=snapshot.id,
            version_id=version_id,
            config=asdict(settings)
            | {
                "config_file": str(settings.config_file or ""),
                "launch": json.loads(json.dumps(asdict(settings.launch), default=str)),
            },
            trigger=self.trigger,
        )
        run_dir = self.dd.runs / run.id
        spec = JobSpec(
            kind=job,
            datasets=datasets_dir,
            base=Path(base),
            out=out,
            version_id=version_id,
            parent=Path(parent.artifact_path)
            if parent is not None and is_adapter(parent.artifact_path)
            else None,
            parent_id=parent.id if parent is not None else None,
            snapshot_id=snapshot.id,
            status=run_dir / "status.json",
            settings=settings,
            reward_model=reward_model,
        )
        launch = settings.launch
        how = "" if launch.launcher == "local" else f" under {launch.launcher} launch"
        self.log(f"{run.id}: training {job} -> {version_id}{how}")
        self._run_process(run.id, "run", spec, launch)
        feedback_rows = {
            kind: snapshot.manifest["tables"][table]["rows"]
            for kind, table in FEEDBACK_TABLES.items()
        }
        manifest = add_manifest_metrics(out, {"feedback_rows": feedback_rows})
        metrics = dict(manifest["metrics"])
        metrics["data"] = manifest.get("data", {})
        version = registry.register_version(
            self.store,
            ModelVersion(
                id=version_id,
                kind=version_kind,  # type: ignore[arg-type]
                base=str(manifest.get("base", base)),
                artifact_path=str(out),
                parent=parent.id if parent else None,
                adapter=bool(manifest.get("adapter", is_adapter(out))),
                snapshot_id=snapshot.id,
                config=manifest.get("config", {}) | {"job": job},
                metrics=metrics,
            ),
        )
        finish_run(self.store, run.id, version_id=version_id, metrics=metrics)
        self.log(f"{run.id}: done, {version_id} {json.dumps(_headline(metrics))}")
        return version

    # ---- gate and promotion ------------------------------------------------------------------

    def run_gate(
        self,
        candidate: ModelVersion,
        reward: ModelVersion,
        datasets_dir: Path,
        settings: GateSettings | None = None,
    ) -> dict[str, Any]:
        settings = settings or self.gate_settings
        incumbent = registry.promoted_version(self.store, "policy")
        assert incumbent is not None, "a candidate always has a served parent"
        run = start_run(
            self.store,
            "gate",
            snapshot_id=candidate.snapshot_id,
            version_id=candidate.id,
            config=asdict(settings) | {"mt_bench": str(settings.mt_bench)},
            trigger=self.trigger,
        )
        run_dir = self.dd.runs / run.id
        spec = GateSpec(
            candidate=Path(candidate.artifact_path),
            incumbent=Path(incumbent.artifact_path),
            reward_model=Path(reward.artifact_path),
            out=run_dir / "gate.json",
            datasets=datasets_dir,
            status=run_dir / "status.json",
            settings=settings,
        )
        self.log(f"{run.id}: gating {candidate.id} against {incumbent.id}")
        self._run_process(run.id, "gate", spec)
        result = json.loads(spec.out.read_text()) | {
            "incumbent": incumbent.id,
            "reward_model": reward.id,
        }
        add_manifest_metrics(candidate.artifact_path, {"gate": result})
        registry.update_metrics(self.store, candidate.id, {"gate": result})
        finish_run(self.store, run.id, version_id=candidate.id, metrics=result)
        self.log(f"{run.id}: {result['reason']}")
        return result

    def _run_process(
        self,
        run_id: str,
        module: str,
        spec: JobSpec | GateSpec,
        launch: LaunchSettings | None = None,
    ) -> None:
        """Run `python -m tuneloop.train.<module>` on `spec` (as `launch` says: a training job
        may run under `accelerate launch`), written into the run's folder with the status file
        and log the job runner follows; raises JobFailed."""
        run_dir = self.dd.runs / run_id
        process = JobProcess(
            job_command(module, spec.write(run_dir / "spec.json"), self.python, launch),
            run_dir / "status.json",
            run_dir / "job.log",
        )
        run_job(self.store, run_id, process, stop=self.stop)

    def _hold_in_canary(self, candidate: ModelVersion, gate: GateSettings) -> tuple[bool, str]:
        """Hand a candidate that passed to the human gate; it stays a candidate when no server
        can serve it beside the served version."""
        passed = "passed the reward model's gate"
        if self.canaries is None:
            return False, f"{passed}; the human gate needs a running server: left a candidate"
        try:
            self.canaries.start(candidate.id, gate)
        except (CanaryError, RuntimeError) as exc:  # RuntimeError: it failed to load
            return False, f"{passed}; no canary ({exc}): left a candidate"
        return True, f"{passed}; held in canary until people judge it"

    def _served_policy(self) -> ModelVersion:
        served = registry.promoted_version(self.store, "policy")
        if served is None:
            raise NothingToTrainError("no policy is served yet: pass --model")
        return served


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


__all__ = [
    "CycleResult",
    "GateSettings",
    "JobFailed",
    "JobSettings",
    "NothingToTrainError",
    "Pipeline",
]
