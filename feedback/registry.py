"""The registry of model versions, kept in the feedback database: what serves, and what came
from what."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from tuneloop.feedback.store import FeedbackStore
from tuneloop.records import ModelVersion


def _from_row(row: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        id=row["id"],
        kind=row["kind"],
        base=row["base"],
        artifact_path=row["artifact_path"],
        parent=row["parent"],
        adapter=row["adapter"],
        snapshot_id=row["snapshot_id"],
        config=json.loads(row["config"]),
        metrics=json.loads(row["metrics"]),
        status=row["status"],
        created_at=row["created_at"],
    )


def list_versions(store: FeedbackStore, kind: str | None = None) -> list[ModelVersion]:
    """Newest first."""
    where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
    rows = store.read(
        f"SELECT * FROM model_versions {where} ORDER BY created_at DESC, id DESC", params
    )
    return [_from_row(r) for r in rows]


def get_version(store: FeedbackStore, version_id: str) -> ModelVersion | None:
    rows = store.read("SELECT * FROM model_versions WHERE id = ?", [version_id])
    return _from_row(rows[0]) if rows else None


def promoted_version(store: FeedbackStore, kind: str = "policy") -> ModelVersion | None:
    rows = store.read(
        "SELECT * FROM model_versions WHERE kind = ? AND status = 'promoted' "
        "ORDER BY created_at DESC LIMIT 1",
        [kind],
    )
    return _from_row(rows[0]) if rows else None


def find_by_artifact(store: FeedbackStore, artifact_path: str) -> ModelVersion | None:
    rows = store.read(
        "SELECT * FROM model_versions WHERE artifact_path = ? ORDER BY created_at DESC LIMIT 1",
        [artifact_path],
    )
    return _from_row(rows[0]) if rows else None


def next_version_id(store: FeedbackStore, kind: str) -> str:
    """`policy-v1`, `policy-v2`, ... (`reward-vN` for reward models)."""
    rows = store.read("SELECT count(*) AS n FROM model_versions WHERE kind = ?", [kind])
    return f"{kind}-v{rows[0]['n'] + 1}"


def register_version(store: FeedbackStore, version: ModelVersion) -> ModelVersion:
    created = version.created_at or datetime.now(UTC)
    store.write(
        lambda con: con.execute(
            "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                version.id,
                version.kind,
                version.base,
                version.parent,
                version.artifact_path,
                version.adapter,
                version.snapshot_id,
                json.dumps(version.config),
                json.dumps(version.metrics),
                version.status,
                created,
            ],
        )
    )
    return get_version(store, version.id)  # type: ignore[return-value]


def set_status(store: FeedbackStore, version_id: str, status: str) -> None:
    """Promoting a policy retires the one promoted before it, in the same transaction."""

    def apply(con: Any) -> None:
        if status == "promoted":
            con.execute(
                "UPDATE model_versions SET status = 'retired' WHERE status = 'promoted' "
                "AND kind = (SELECT kind FROM model_versions WHERE id = ?)",
                [version_id],
            )
        con.execute("UPDATE model_versions SET status = ? WHERE id = ?", [status, version_id])

    store.write(apply)
