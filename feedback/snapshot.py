"""Snapshots: the feedback store frozen into parquet files that training reads.

Training never reads the live database. A snapshot copies every data table to
`snapshots/<id>/<table>.parquet`, all inside one read transaction, so the tables agree with each
other (no feedback row refers to a response the snapshot lacks) while the writer keeps inserting.
Files are written as `.tmp` and renamed, and the directory is built as `<id>.tmp/` and renamed
last, so a directory named like a snapshot id is always complete. A model version names the
snapshot it was trained on: that is its provenance.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneloop.core.files import write_atomic
from tuneloop.core.settings import TrustSettings
from tuneloop.feedback.raters import rater_weights
from tuneloop.feedback.store import FEEDBACK_TABLES, FeedbackStore
from tuneloop.feedback.trust import admitted

# Every table that holds feedback data, in the order they are copied. Registry and bookkeeping
# tables (model_versions, training_runs, snapshots, schema_migrations) are not training data.
SNAPSHOT_TABLES: tuple[str, ...] = (
    "raters",
    "conversations",
    "messages",
    "responses",
    "thumbs",
    "ratings",
    "edits",
    "comparisons",
    "rankings",
    "accounts",
)
# What a snapshot keeps of the accounts: who is a user, a rater or above, or trusted (the trust
# policy's caps and edits in `feedback.datasets`), and the trust weight of their judgments
# (`feedback.raters.rater_weights`; 1 where none is given); never their tokens. `{weights}` is a
# relation (name, weight).
_SELECTS = {
    "accounts": "SELECT a.name, a.role, coalesce(a.trusted, false) AS trusted, "
    "coalesce(w.weight, 1.0)::DOUBLE AS weight FROM accounts a LEFT JOIN {weights} USING (name)",
}
# Tables whose `id` is a BIGINT, so that a max id says how far the snapshot reaches.
_INTEGER_ID_TABLES = frozenset(SNAPSHOT_TABLES) - {"raters", "messages", "accounts"}
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    id: str
    path: Path
    manifest: dict[str, Any]


def new_snapshot_id(now: datetime | None = None) -> str:
    """`snap-20261123T104512Z-3fa2c1`: sorts by creation time; the suffix keeps ids unique."""
    now = now or datetime.now(UTC)
    return f"snap-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def create_snapshot(
    store: FeedbackStore, snapshots_dir: Path, trust: TrustSettings | None = None
) -> Snapshot:
    """Copy the store's data tables to `snapshots_dir/<id>/` and record the snapshot. Feedback
    tables keep the rows `trust` admits (default: enabled accounts and imports); the manifest
    says how many it left out. The accounts carry each rater's trust weight as it stands now
    (all 1 without `trust.rater_weights`)."""
    trust = trust or TrustSettings()
    weights = (
        {name: w.weight for name, w in rater_weights(store).items()} if trust.rater_weights else {}
    )
    created_at = datetime.now(UTC)
    snapshot_id = new_snapshot_id(created_at)
    snapshots_dir = Path(snapshots_dir).resolve()
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = snapshots_dir / f"{snapshot_id}.tmp"
    final_dir = snapshots_dir / snapshot_id
    tmp_dir.mkdir()
    try:
        tables, migrations = _copy_tables(store, tmp_dir, trust, weights)
        manifest = {
            "version": MANIFEST_VERSION,
            "id": snapshot_id,
            "created_at": created_at.isoformat(),
            "trust": asdict(trust),
            "tables": tables,
            "schema_migrations": migrations,
        }
        write_atomic(tmp_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n", durable=True)
        _fsync(tmp_dir)
        tmp_dir.rename(final_dir)
        _fsync(snapshots_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    try:
        store.write(
            lambda con: con.execute(
                "INSERT INTO snapshots (id, path, manifest, created_at) VALUES (?, ?, ?, ?)",
                [snapshot_id, str(final_dir), json.dumps(manifest), created_at],
            )
        )
    except BaseException:
        # Unrecorded, the directory would be a snapshot nobody can list: remove it.
        shutil.rmtree(final_dir, ignore_errors=True)
        raise
    return Snapshot(id=snapshot_id, path=final_dir, manifest=manifest)


def _copy_tables(
    store: FeedbackStore, out_dir: Path, trust: TrustSettings, weights: dict[str, float]
) -> tuple[dict[str, Any], list[str]]:
    """COPY every table inside one read transaction; returns per-table stats and migrations.

    `rows` counts what was copied; `max_id` is the largest id in the table at that moment,
    copied or not (how far the snapshot reached: rows past it are new to the scheduler)."""
    tables: dict[str, Any] = {}
    feedback = set(FEEDBACK_TABLES.values())
    with store.cursor() as cur:
        cur.execute("BEGIN TRANSACTION")
        try:
            for table in SNAPSHOT_TABLES:
                file_name = f"{table}.parquet"
                tmp = out_dir / f"{file_name}.tmp"
                keep = admitted(trust) if table in feedback else "true"
                select = _SELECTS.get(table, f"SELECT * FROM {table}").format(
                    weights=_weights_relation(weights)
                )
                cur.execute(
                    f"COPY ({select} WHERE {keep}) TO '{_sql_str(tmp)}' (FORMAT parquet)"
                ).fetchall()
                _fsync(tmp)
                tmp.rename(out_dir / file_name)
                max_id = "max(id)" if table in _INTEGER_ID_TABLES else "NULL"
                rows, top, left_out = cur.execute(
                    f"SELECT count(*) FILTER ({keep}), {max_id}, count(*) FILTER (NOT {keep}) "
                    f"FROM {table}"
                ).fetchall()[0]
                tables[table] = {"file": file_name, "rows": int(rows), "max_id": top}
                if table in feedback:
                    tables[table]["left_out"] = int(left_out)
            migrations = [
                name
                for (name,) in cur.execute(
                    "SELECT name FROM schema_migrations ORDER BY applied_at, name"
                ).fetchall()
            ]
        finally:
            cur.execute("ROLLBACK")  # read-only: nothing to commit
    return tables, migrations


def _weights_relation(weights: dict[str, float]) -> str:
    """`weights` as a SQL relation w(name, weight), inlined: COPY takes no parameters."""
    rows = ", ".join(f"('{_sql_str(name)}', {float(w)!r})" for name, w in sorted(weights.items()))
    if not rows:
        return "(SELECT NULL::VARCHAR AS name, NULL::DOUBLE AS weight WHERE false) w"
    return f"(VALUES {rows}) w(name, weight)"


def latest_snapshot(store: FeedbackStore) -> Snapshot | None:
    newest = _recorded(store, "ORDER BY created_at DESC, id DESC LIMIT 1")
    return newest[0] if newest else None


def _recorded(store: FeedbackStore, order_limit: str) -> list[Snapshot]:
    with store.cursor() as cur:
        rows = cur.execute(f"SELECT id, path, manifest FROM snapshots {order_limit}").fetchall()
    return [Snapshot(id=i, path=Path(p), manifest=json.loads(m)) for i, p, m in rows]


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the snapshot directory `path`."""
    return json.loads((Path(path) / MANIFEST_NAME).read_text())


def _sql_str(path: Path | str) -> str:
    return str(path).replace("'", "''")


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a rename never publishes data still in cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
