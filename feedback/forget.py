"""Forgetting a person: their conversations, answers and feedback leave the database and every
snapshot (whose datasets are rebuilt), their account goes, and the model versions trained on a
snapshot that held their rows are marked (`trained_on_forgotten`), since weights cannot unlearn.

What counts as theirs: the conversations they started (with every message and answer in them),
every feedback row they gave, and every feedback row anyone gave on their answers (it would
point at nothing). Snapshots are rewritten in place, file by file through `.tmp` renames; the
manifest records that, and how many rows went, without the name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from tuneloop.core.files import write_atomic
from tuneloop.feedback.accounts import write_audit
from tuneloop.feedback.datasets import DATASETS_DIRNAME, build_datasets
from tuneloop.feedback.snapshot import MANIFEST_NAME, SNAPSHOT_TABLES
from tuneloop.feedback.store import FeedbackStore


@dataclass(frozen=True)
class Forgotten:
    name: str
    rows: dict[str, int]  # deleted from the database, per table
    snapshots: list[str]  # rewritten
    versions: list[str]  # trained on their rows: marked


def _theirs(name: str, conversations: list[int], responses: list[int]) -> dict[str, str]:
    """Per table, a SQL condition true for the rows to forget."""
    who = "'" + name.replace("'", "''") + "'"
    convs = f"[{', '.join(map(str, conversations))}]::BIGINT[]"
    resps = f"[{', '.join(map(str, responses))}]::BIGINT[]"
    on_theirs = f"rater_id = {who} OR list_contains({resps}, response_id)"
    return {
        "raters": f"id = {who}",
        "conversations": f"list_contains({convs}, id)",
        "messages": (
            f"list_contains({convs}, conversation_id) OR "
            f"coalesce(list_contains({resps}, response_id), false)"
        ),
        "responses": f"list_contains({resps}, id) OR rater_id = {who}",
        "thumbs": on_theirs,
        "ratings": on_theirs,
        "edits": on_theirs,
        "comparisons": (
            f"rater_id = {who} OR list_contains({resps}, response_a) "
            f"OR list_contains({resps}, response_b)"
        ),
        "rankings": f"rater_id = {who} OR list_has_any({resps}, response_ids)",
        "accounts": f"name = {who}",
    }


def forget(store: FeedbackStore, name: str, *, actor: str) -> Forgotten:
    """Forget `name` everywhere (see the module's docstring); audited under `actor`."""
    conversations = [
        r["id"] for r in store.read("SELECT id FROM conversations WHERE rater_id = ?", [name])
    ]
    responses = [
        r["id"]
        for r in store.read(
            "SELECT id FROM responses WHERE rater_id = ? OR list_contains(?::BIGINT[], "
            "conversation_id)",
            [name, conversations],
        )
    ]
    theirs = _theirs(name, conversations, responses)
    snapshots = [(r["id"], Path(r["path"])) for r in store.read("SELECT id, path FROM snapshots")]
    touched = [sid for sid, path in snapshots if path.exists() and _rewrite(path, theirs)]

    def delete(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, int], list[str]]:
        rows = {}
        for table in reversed(SNAPSHOT_TABLES):  # feedback before what it points at
            (n,) = con.execute(f"SELECT count(*) FROM {table} WHERE {theirs[table]}").fetchone()
            con.execute(f"DELETE FROM {table} WHERE {theirs[table]}")
            rows[table] = int(n)
        # Rating tasks of their prompts or answers go too (judgments of them went above), and
        # what they skipped or were held for.
        resps_sql = f"[{', '.join(map(str, responses))}]::BIGINT[]"
        con.execute(
            "DELETE FROM task_skips WHERE rater_id = ? OR task_id IN (SELECT id FROM tasks "
            f"WHERE author = ? OR list_has_any({resps_sql}, response_ids))",
            [name, name],
        )
        con.execute(
            f"DELETE FROM tasks WHERE author = ? OR list_has_any({resps_sql}, response_ids)",
            [name],
        )
        con.execute("DELETE FROM quarantine WHERE rater_id = ?", [name])
        marked = [
            vid
            for (vid,) in con.execute(
                "UPDATE model_versions SET trained_on_forgotten = true "
                "WHERE list_contains(?::VARCHAR[], snapshot_id) RETURNING id",
                [touched],
            ).fetchall()
        ]
        write_audit(con, actor, "account.forget", name, {"rows": sum(rows.values())})
        return rows, sorted(marked)

    rows, versions = store.write(delete)
    return Forgotten(name, rows, touched, versions)


def _rewrite(snapshot_dir: Path, theirs: dict[str, str]) -> bool:
    """Drop the forgotten rows from one snapshot's files; rebuild its datasets if it has
    them. Whether it held any."""
    manifest = json.loads((snapshot_dir / MANIFEST_NAME).read_text())
    con = duckdb.connect()
    dropped: dict[str, int] = {}
    try:
        for table, info in manifest["tables"].items():
            path = snapshot_dir / info["file"]
            source = f"read_parquet('{_sql_str(path)}')"
            (n,) = con.execute(f"SELECT count(*) FROM {source} WHERE {theirs[table]}").fetchone()
            if not n:
                continue
            tmp = path.with_name(path.name + ".tmp")
            con.execute(
                f"COPY (SELECT * FROM {source} WHERE NOT ({theirs[table]})) "
                f"TO '{_sql_str(tmp)}' (FORMAT parquet)"
            )
            tmp.replace(path)
            info["rows"] -= int(n)
            dropped[table] = int(n)
    finally:
        con.close()
    if not dropped:
        return False
    rewrites: list[dict[str, Any]] = manifest.setdefault("rewritten", [])
    rewrites.append({"at": datetime.now(UTC).isoformat(), "forgotten_rows": dropped})
    write_atomic(snapshot_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n", durable=True)
    if (snapshot_dir / DATASETS_DIRNAME).exists():
        build_datasets(snapshot_dir)
    return True


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")
