"""The registry of model versions, kept in the feedback database: what serves, and what came
from what."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tuneloop.core.records import ModelVersion
from tuneloop.feedback.store import FeedbackStore


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
        status_reason=row["status_reason"],
        trained_on_forgotten=bool(row["trained_on_forgotten"]),
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


class RegistryError(ValueError):
    """A registry change that cannot be made (unknown version, nothing to roll back to)."""


class UnknownVersionError(RegistryError):
    """No version has this id."""


def require_version(store: FeedbackStore, version_id: str) -> ModelVersion:
    version = get_version(store, version_id)
    if version is None:
        known = ", ".join(v.id for v in list_versions(store)[:10]) or "none yet"
        raise UnknownVersionError(f"unknown model version {version_id!r} (newest: {known})")
    return version


def register_version(store: FeedbackStore, version: ModelVersion) -> ModelVersion:
    created = version.created_at or datetime.now(UTC)
    store.write(
        lambda con: con.execute(
            "INSERT INTO model_versions (id, kind, base, parent, artifact_path, adapter, "
            "snapshot_id, config, metrics, status, created_at, status_reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                version.status_reason,
            ],
        )
    )
    return get_version(store, version.id)  # type: ignore[return-value]


def update_metrics(store: FeedbackStore, version_id: str, metrics: dict[str, Any]) -> None:
    """Merge `metrics` into the version's metrics (the gate adds its result this way)."""
    current = require_version(store, version_id).metrics
    store.write(
        lambda con: con.execute(
            "UPDATE model_versions SET metrics = ? WHERE id = ?",
            [json.dumps(current | metrics), version_id],
        )
    )


def reject(store: FeedbackStore, version_id: str, reason: str) -> None:
    require_version(store, version_id)
    store.write(
        lambda con: con.execute(
            "UPDATE model_versions SET status = 'rejected', status_reason = ? WHERE id = ?",
            [reason, version_id],
        )
    )


def promote(
    store: FeedbackStore, version_id: str, *, reason: str, action: str = "promote"
) -> ModelVersion | None:
    """Make `version_id` the promoted version of its kind, in one transaction with the history
    row; returns the version it replaced. The replaced one is retired (it can come back through
    a rollback) or, when `action` is "rollback", rejected (a later rollback goes further back).
    The promoted version is read inside the transaction, so concurrent promotions never leave
    two versions promoted.
    """
    version = require_version(store, version_id)
    demoted = "rejected" if action == "rollback" else "retired"

    def apply(con: Any) -> str | None:
        current = [
            row[0]
            for row in con.execute(
                "SELECT id FROM model_versions WHERE kind = ? AND status = 'promoted' "
                "ORDER BY created_at DESC",
                [version.kind],
            ).fetchall()
        ]
        if version_id in current:
            raise RegistryError(f"{version_id} is already the promoted {version.kind}")
        previous = current[0] if current else None
        now = datetime.now(UTC)
        if current:
            con.execute(
                "UPDATE model_versions SET status = ?, status_reason = ? "
                "WHERE id IN (SELECT unnest(?::VARCHAR[]))",
                [demoted, f"{action}: replaced by {version_id}", current],
            )
        con.execute(
            "UPDATE model_versions SET status = 'promoted', status_reason = ? WHERE id = ?",
            [reason, version_id],
        )
        con.execute(
            "INSERT INTO promotions SELECT coalesce(max(id), 0) + 1, ?, ?, ?, ?, ?, ? "
            "FROM promotions",
            [version.kind, version_id, previous, action, reason, now],
        )
        return previous

    previous_id = store.write(apply)
    return get_version(store, previous_id) if previous_id else None


def rollback_target(store: FeedbackStore, kind: str = "policy") -> ModelVersion:
    """The version a rollback would serve: the latest one promoted before the current one that
    was retired (not rejected, not rolled back from)."""
    current = promoted_version(store, kind)
    rows = store.read(
        "SELECT v.* FROM promotions p JOIN model_versions v ON v.id = p.version_id "
        "WHERE p.kind = ? AND v.status = 'retired' ORDER BY p.id DESC LIMIT 1",
        [kind],
    )
    if not rows:
        served = f" than {current.id}" if current else ""
        raise RegistryError(f"no earlier {kind} version to roll back to{served}")
    return _from_row(rows[0])


def ensure_served_policy(
    store: FeedbackStore,
    model: str | None,
    resolve: Callable[[str], str],
    *,
    reason: str,
    default: str | None = None,
) -> ModelVersion:
    """The policy to serve or train from: `model` if given (a spec that `resolve` turns into a
    checkpoint path; registered on first use and promoted), else the promoted policy, else
    `default` (the caller's default model). So every command works on a fresh data dir."""
    if model is None:
        current = promoted_version(store, "policy")
        if current is not None:
            return current
        if default is None:
            raise RegistryError("no policy is served yet: pass a model")
        model = default
    path = resolve(model)
    version = find_by_artifact(store, path)
    if version is None:
        version = register_version(
            store,
            ModelVersion(
                id=next_version_id(store, "policy"), kind="policy", base=model, artifact_path=path
            ),
        )
    if version.status != "promoted":
        promote(store, version.id, reason=reason.format(model=model))
    return require_version(store, version.id)
