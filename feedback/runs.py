"""Training-run rows: one per job (reward model, policy, gate), updated while it runs so that the
Operator tab and `tuneloop runs` can show its progress, and left with its error when it fails."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from tuneloop.core.records import TrainingRun
from tuneloop.feedback.store import FeedbackStore


def _from_row(row: dict[str, Any]) -> TrainingRun:
    return TrainingRun(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        progress=row["progress"],
        started_at=row["started_at"],
        stage=row["stage"],
        snapshot_id=row["snapshot_id"],
        version_id=row["version_id"],
        config=json.loads(row["config"]),
        metrics=json.loads(row["metrics"]) if row["metrics"] else {},
        error=row["error"],
        trigger=row["trigger"],
        finished_at=row["finished_at"],
    )


def new_run_id(kind: str, now: datetime | None = None) -> str:
    """`run-20261123T104512Z-dpo-3fa2`: sorts by start time."""
    now = now or datetime.now(UTC)
    return f"run-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{kind}-{secrets.token_hex(2)}"


def start_run(
    store: FeedbackStore,
    kind: str,
    *,
    snapshot_id: str | None = None,
    version_id: str | None = None,
    config: dict[str, Any] | None = None,
    trigger: str = "operator",
) -> TrainingRun:
    run_id = new_run_id(kind)
    store.write(
        lambda con: con.execute(
            "INSERT INTO training_runs (id, kind, status, progress, snapshot_id, version_id, "
            "config, started_at, stage, metrics, trigger) "
            "VALUES (?, ?, 'running', 0, ?, ?, ?, ?, 'starting', '{}', ?)",
            [
                run_id,
                kind,
                snapshot_id,
                version_id,
                json.dumps(config or {}),
                datetime.now(UTC),
                trigger,
            ],
        )
    )
    return get_run(store, run_id)  # type: ignore[return-value]


def update_run(
    store: FeedbackStore,
    run_id: str,
    *,
    progress: float | None = None,
    stage: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    sets, params = [], []
    if progress is not None:
        sets.append("progress = ?")
        params.append(min(max(float(progress), 0.0), 1.0))
    if stage is not None:
        sets.append("stage = ?")
        params.append(stage)
    if metrics is not None:
        sets.append("metrics = ?")
        params.append(json.dumps(metrics))
    if sets:
        sql = f"UPDATE training_runs SET {', '.join(sets)} WHERE id = ?"
        store.write(lambda con: con.execute(sql, [*params, run_id]))


def finish_run(
    store: FeedbackStore,
    run_id: str,
    *,
    version_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Close the run: done, or failed with `error` (one clear line for the operator)."""
    status = "failed" if error else "done"
    store.write(
        lambda con: con.execute(
            "UPDATE training_runs SET status = ?, error = ?, finished_at = ?, "
            "version_id = coalesce(?, version_id), metrics = coalesce(?, metrics), "
            "progress = CASE WHEN ? THEN 1.0 ELSE progress END, stage = ? WHERE id = ?",
            [
                status,
                error,
                datetime.now(UTC),
                version_id,
                json.dumps(metrics) if metrics is not None else None,
                status == "done",
                status,
                run_id,
            ],
        )
    )


def get_run(store: FeedbackStore, run_id: str) -> TrainingRun | None:
    rows = store.read("SELECT * FROM training_runs WHERE id = ?", [run_id])
    return _from_row(rows[0]) if rows else None


def list_runs(store: FeedbackStore, limit: int = 50) -> list[TrainingRun]:
    """Newest first."""
    rows = store.read(
        "SELECT * FROM training_runs ORDER BY started_at DESC, id DESC LIMIT ?", [limit]
    )
    return [_from_row(r) for r in rows]


def fail_interrupted_runs(store: FeedbackStore) -> int:
    """Mark runs left 'running' by a process that died as failed; returns how many. Called when
    a store's owner starts, before it starts any job of its own."""
    left = int(
        store.read("SELECT count(*) AS n FROM training_runs WHERE status = 'running'")[0]["n"]
    )
    if left == 0:
        return 0
    store.write(
        lambda con: con.execute(
            "UPDATE training_runs SET status = 'failed', finished_at = ?, stage = 'failed', "
            "error = 'interrupted: the process running it stopped' WHERE status = 'running'",
            [datetime.now(UTC)],
        )
    )
    return left
