"""Snapshots of a real DuckDB store: manifest, consistency under concurrent writes, atomicity."""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from tuneloop.core.records import (
    Comparison,
    Edit,
    Message,
    Ranking,
    Rating,
    Response,
    SamplingParams,
    Thumbs,
)
from tuneloop.core.settings import TrustSettings
from tuneloop.feedback import snapshot as snapshot_mod
from tuneloop.feedback.migrations import MIGRATIONS
from tuneloop.feedback.snapshot import (
    SNAPSHOT_TABLES,
    Snapshot,
    create_snapshot,
    latest_snapshot,
    load_manifest,
    new_snapshot_id,
)
from tuneloop.feedback.store import FeedbackStore

ID_RE = re.compile(r"^snap-\d{8}T\d{6}Z-[0-9a-f]{6}$")


# The rows here carry made-up rater names, not accounts: admit them.
ANY_RATER = TrustSettings(anonymous=True)


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def answer(store: FeedbackStore, prompt: tuple[Message, ...], text: str, conv: int) -> int:
    rid = store.new_response_id()
    store.submit_response(
        Response(
            id=rid,
            conversation_id=conv,
            prompt=prompt,
            text=text,
            model_version_id="base-v0",
            params=SamplingParams(max_tokens=128, temperature=0.2),
            prompt_tokens=12,
            completion_tokens=30,
            latency_ms=41.5,
            rater_id="alice",
        )
    ).result()
    return rid


def populate(store: FeedbackStore) -> dict[str, list[int]]:
    """Two conversations, five answers, every feedback kind; returns the ids written."""
    ids: dict[str, list[int]] = {"responses": [], "feedback": []}
    tea = (Message("system", "Be brief."), Message("user", "How do I brew green tea?"))
    bike = (Message("user", "Why does my bike chain skip?"),)
    c1, c2 = store.new_conversation_id(), store.new_conversation_id()
    r = ids["responses"]
    r.append(answer(store, tea, "Steep at 80 °C for 2 minutes.", c1))
    r.append(answer(store, tea, "Use boiling water for 10 minutes.", c1))
    r.append(answer(store, tea, "80 °C, 2-3 minutes, then remove the leaves.", c1))
    r.append(answer(store, bike, "The chain or cassette is worn.", c2))
    r.append(answer(store, bike, "Check the derailleur hanger alignment.", c2))
    for fb in (
        Thumbs(r[0], 1, rater_id="alice"),
        Thumbs(r[1], -1, rater_id="bob"),
        Rating(r[2], 5, reason="complete", rater_id="bob"),
        Edit(r[1], "Use water at about 80 °C for 2 minutes.", rater_id="carol"),
        Comparison(r[3], r[4], "b", rater_id="rater-1"),
        Ranking((r[2], r[0], r[1]), rater_id="rater-1"),
    ):
        ids["feedback"].append(store.record_feedback(fb))
    return ids


def table_path(snap: Snapshot, table: str) -> Path:
    return snap.path / snap.manifest["tables"][table]["file"]


def recorded_snapshots(store: FeedbackStore) -> list[Snapshot]:
    """Every recorded snapshot, oldest first, read back from the store."""
    rows = store.read("SELECT id, path, manifest FROM snapshots ORDER BY created_at, id")
    return [Snapshot(r["id"], Path(r["path"]), json.loads(r["manifest"])) for r in rows]


def parquet_rows(path: Path, sql: str = "SELECT count(*) FROM t") -> list[tuple]:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{path}')")
    return con.execute(sql).fetchall()


def test_manifest_counts_max_ids_and_files(store: FeedbackStore, tmp_path: Path) -> None:
    ids = populate(store)
    snaps = tmp_path / "snapshots"

    before = datetime.now(UTC)
    snap = create_snapshot(store, snaps, ANY_RATER)
    after = datetime.now(UTC)

    assert ID_RE.match(snap.id)
    assert snap.path == (snaps / snap.id).resolve()
    assert load_manifest(snap.path) == snap.manifest
    m = snap.manifest
    assert m["id"] == snap.id
    created = datetime.fromisoformat(m["created_at"])
    assert created.utcoffset() == timedelta(0) and before <= created <= after
    assert snap.id.startswith(f"snap-{created:%Y%m%dT%H%M%SZ}-")  # the id sorts by creation
    assert m["schema_migrations"] == [name for name, _ in MIGRATIONS]
    assert set(m["tables"]) == set(SNAPSHOT_TABLES)
    expected = {
        "raters": (4, None),  # alice, bob, carol, rater-1
        "conversations": (2, 2),
        "messages": (3 + 3 + 2, None),  # 2 prompt turns + 3 answers; 1 turn + 2 answers
        "responses": (5, max(ids["responses"])),
        "thumbs": (2, 2),
        "ratings": (1, 1),
        "edits": (1, 1),
        "comparisons": (1, 1),
        "rankings": (1, 1),
    }
    for table, (rows, max_id) in expected.items():
        info = m["tables"][table]
        assert (info["rows"], info["max_id"]) == (rows, max_id), table
        assert m["tables"][table]["file"] == f"{table}.parquet"
        assert parquet_rows(table_path(snap, table)) == [(rows,)], table
    # The copy is the data, not only its shape.
    assert parquet_rows(table_path(snap, "rankings"), "SELECT response_ids FROM t") == [
        ([ids["responses"][2], ids["responses"][0], ids["responses"][1]],)
    ]
    # No leftovers of the tmp-then-rename steps.
    assert sorted(p.name for p in snaps.iterdir()) == [snap.id]
    assert sorted(p.name for p in snap.path.iterdir()) == sorted(
        ["manifest.json", *(f"{t}.parquet" for t in SNAPSHOT_TABLES)]
    )


def test_snapshots_are_recorded_listed_and_sortable(store: FeedbackStore, tmp_path: Path) -> None:
    assert recorded_snapshots(store) == []
    assert latest_snapshot(store) is None
    populate(store)
    first = create_snapshot(store, tmp_path / "snaps", ANY_RATER)
    store.record_feedback(Thumbs(1, -1, rater_id="dave"))
    second = create_snapshot(store, tmp_path / "snaps", ANY_RATER)

    listed = recorded_snapshots(store)
    assert [s.id for s in listed] == [first.id, second.id]
    assert listed[1] == second
    assert latest_snapshot(store) == second
    assert second.manifest["tables"]["thumbs"]["rows"] == 3
    assert first.manifest["tables"]["thumbs"]["rows"] == 2
    rows = store.read("SELECT id, path, manifest FROM snapshots ORDER BY created_at")
    assert [(r["id"], r["path"]) for r in rows] == [
        (first.id, str(first.path)),
        (second.id, str(second.path)),
    ]
    assert json.loads(rows[0]["manifest"]) == first.manifest

    t0 = datetime(2026, 11, 23, 23, 59, 59, tzinfo=UTC)
    later = [new_snapshot_id(t0 + timedelta(seconds=s)) for s in (0, 1, 3600, 86400 * 40)]
    assert sorted(later) == later
    assert later[0].startswith("snap-20261123T235959Z-")


def test_snapshot_is_consistent_while_the_writer_inserts(
    store: FeedbackStore, tmp_path: Path
) -> None:
    """A response and the thumbs on it commit in separate transactions; a snapshot that read
    the tables at different moments would hold thumbs whose response it lacks."""
    prompt = (Message("user", "Name a prime number."),)
    conv = store.new_conversation_id()
    seed = [answer(store, prompt, f"{n} is prime.", conv) for n in (2, 3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_writing() -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                rid = answer(store, prompt, f"{n} might be prime.", conv)
                store.record_feedback(Thumbs(rid, 1 if n % 2 else -1))
                store.record_feedback(Comparison(rid, seed[n % 2], "a"))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        snaps = []
        while len(snaps) < 4:
            snaps.append(create_snapshot(store, tmp_path / "snaps", ANY_RATER))
    finally:
        stop.set()
        writer.join()
    assert errors == []

    thumbs_seen = [s.manifest["tables"]["thumbs"]["rows"] for s in snaps]
    assert thumbs_seen == sorted(thumbs_seen)
    assert thumbs_seen[-1] > thumbs_seen[0], "the writer made no progress during snapshots"
    final = store.feedback_counts()["thumbs"]
    assert final > thumbs_seen[0]
    for snap in snaps:
        con = duckdb.connect()
        for table in ("responses", "thumbs", "comparisons", "messages"):
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{table_path(snap, table)}')"
            )
        orphans = con.execute(
            """
            SELECT (SELECT count(*) FROM thumbs
                    WHERE response_id NOT IN (SELECT id FROM responses)),
                   (SELECT count(*) FROM comparisons
                    WHERE response_a NOT IN (SELECT id FROM responses)),
                   (SELECT count(*) FROM responses
                    WHERE id NOT IN (SELECT response_id FROM messages
                                     WHERE response_id IS NOT NULL)),
                   (SELECT count(*) FROM messages
                    WHERE response_id NOT IN (SELECT id FROM responses)),
                   (SELECT max(id) FROM thumbs),
                   (SELECT count(*) FROM responses)
            """
        ).fetchall()[0]
        tables = snap.manifest["tables"]
        assert orphans[:4] == (0, 0, 0, 0), snap.id
        assert orphans[4] == tables["thumbs"]["max_id"]
        assert orphans[5] == tables["responses"]["rows"]
    assert not list((tmp_path / "snaps").glob("*.tmp"))


def test_failed_snapshot_leaves_no_directory_and_no_record(
    store: FeedbackStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(store)
    monkeypatch.setattr(snapshot_mod, "SNAPSHOT_TABLES", ("responses", "no_such_table"))
    snaps = tmp_path / "snaps"

    with pytest.raises(duckdb.CatalogException):
        create_snapshot(store, snaps, ANY_RATER)

    assert list(snaps.iterdir()) == []
    assert recorded_snapshots(store) == []
    # The cursor's read transaction was closed: the store still writes and snapshots.
    monkeypatch.undo()
    store.record_feedback(Thumbs(1, 1, rater_id="erin"))
    assert create_snapshot(store, snaps, ANY_RATER).manifest["tables"]["thumbs"]["rows"] == 3


def test_the_trust_policy_keeps_accounts_and_imports_and_drops_the_rest(
    store: FeedbackStore, tmp_path: Path
) -> None:
    """alice and bob have accounts; bob is disabled (a troll found out); carol and rater-1 are
    no accounts. 500 edits from the disabled troll (one vote per answer: 5 rows) never reach a
    snapshot or a dataset."""
    from tuneloop.feedback import accounts
    from tuneloop.feedback.datasets import build_datasets

    ids = populate(store)
    for name in ("alice", "bob"):
        accounts.add_account(store, name, "rater", actor="admin")
    for i in range(500):
        store.record_feedback(
            Edit(ids["responses"][i % 5], f"Visit http://spam.example/{i}", rater_id="bob")
        )
    accounts.set_disabled(store, "bob", True, actor="admin")
    store.record_feedback(Thumbs(ids["responses"][3], 1, rater_id="import"))

    strict = create_snapshot(store, tmp_path / "snaps")
    tables = strict.manifest["tables"]
    assert strict.manifest["trust"] == {
        "anonymous": False,
        "pair_sources": "all",
        "max_user_share": 0.05,
        "edits": "trusted",
        "rater_weights": True,
    }
    assert (tables["thumbs"]["rows"], tables["thumbs"]["left_out"]) == (2, 1)  # alice, import
    assert (tables["edits"]["rows"], tables["edits"]["left_out"]) == (0, 6)  # bob's 5, carol's
    assert (tables["comparisons"]["rows"], tables["comparisons"]["left_out"]) == (0, 1)
    assert tables["edits"]["max_id"] == 6  # how far it reached, kept rows or not
    raters = parquet_rows(table_path(strict, "thumbs"), "SELECT DISTINCT rater_id FROM t")
    assert sorted(raters) == [("alice",), ("import",)]
    built = build_datasets(strict.path)
    rows = [
        parquet_rows(path, "SELECT * FROM t")
        for files in built.values()
        for path in (files.train, files.heldout)
    ]
    assert sum(map(len, rows)) > 0 and "spam.example" not in json.dumps(rows, default=str)

    open_ = create_snapshot(store, tmp_path / "snaps", TrustSettings(anonymous=True))
    tables = open_.manifest["tables"]
    assert (tables["edits"]["rows"], tables["edits"]["left_out"]) == (1, 5)  # carol's only
    assert tables["comparisons"]["rows"] == 1
