"""`tuneloop users forget`: a person's rows leave the database, every snapshot and its
datasets; the versions trained on them are marked; everyone else's rows stay."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from tuneloop.core.records import (
    Comparison,
    Edit,
    Message,
    ModelVersion,
    Response,
    SamplingParams,
    Thumbs,
)
from tuneloop.core.settings import TrustSettings
from tuneloop.feedback import accounts, registry
from tuneloop.feedback.datasets import build_datasets
from tuneloop.feedback.forget import forget
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "f.duckdb") as s:
        yield s


def answer(store: FeedbackStore, owner: str, prompt: str, text: str, conv: int) -> int:
    rid = store.new_response_id()
    store.submit_response(
        Response(
            id=rid,
            conversation_id=conv,
            prompt=(Message("user", prompt),),
            text=text,
            model_version_id="policy-v1",
            params=SamplingParams(16, 0.7),
            prompt_tokens=4,
            completion_tokens=4,
            latency_ms=1.0,
            rater_id=owner,
        )
    ).result()
    return rid


def every_value(path: Path) -> str:
    """Everything in a directory's parquet files, as text."""
    with duckdb.connect() as con:
        return json.dumps(
            [
                con.execute(f"SELECT * FROM '{p}'").fetchall()
                for p in sorted(path.rglob("*.parquet"))
            ],
            default=str,
        )


def test_forget_removes_a_person_everywhere_and_marks_what_learned_from_them(
    store: FeedbackStore, tmp_path: Path
) -> None:
    for name in ("ann", "ben"):
        accounts.add_account(store, name, "rater", actor="admin")
    ann_conv, ben_conv = store.new_conversation_id("ann"), store.new_conversation_id("ben")
    a1 = answer(store, "ann", "ann-secret-prompt", "ann-answer-one", ann_conv)
    a2 = answer(store, "ann", "ann-secret-prompt", "ann-answer-two", ann_conv)
    b1 = answer(store, "ben", "ben-prompt", "ben-answer-one", ben_conv)
    b2 = answer(store, "ben", "ben-prompt", "ben-answer-two", ben_conv)
    store.record_feedback(Thumbs(a1, 1, "ann"))
    store.record_feedback(Edit(a2, "ann-edit-text", "ann"))
    store.record_feedback(Comparison(a1, a2, "a", "ben"))  # ben judged ann's answers
    store.record_feedback(Comparison(b1, b2, "b", "ann"))  # ann judged ben's
    store.record_feedback(Comparison(b1, b2, "a", "ben"))
    store.record_feedback(Thumbs(b1, -1, "ben"))
    snap = create_snapshot(store, tmp_path / "snaps", TrustSettings())
    build_datasets(snap.path)
    assert "ann-secret-prompt" in every_value(snap.path)
    registry.register_version(
        store,
        ModelVersion(
            id="policy-v2", kind="policy", base="b", artifact_path="/x", snapshot_id=snap.id
        ),
    )

    done = forget(store, "ann", actor="admin")

    assert done.snapshots == [snap.id] and done.versions == ["policy-v2"]
    assert done.rows["responses"] == 2 and done.rows["comparisons"] == 2
    db = json.dumps(
        [store.read(f"SELECT * FROM {t}") for t in ("responses", "messages", "edits")],
        default=str,
    )
    assert "ann" not in db
    for table in ("thumbs", "comparisons", "conversations"):
        assert not store.read(f"SELECT * FROM {table} WHERE rater_id = 'ann'"), table
    assert not store.read("SELECT * FROM raters WHERE id = 'ann'")
    assert store.read("SELECT rater_id, winner FROM comparisons") == [
        {"rater_id": "ben", "winner": "a"}
    ]
    assert [a.name for a in accounts.list_accounts(store)] == ["ben"]
    on_disk = every_value(snap.path)
    assert "ann" not in on_disk and "ben-answer-one" in on_disk  # datasets rebuilt too
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["tables"]["comparisons"]["rows"] == 1
    assert manifest["rewritten"][0]["forgotten_rows"]["responses"] == 2
    assert registry.require_version(store, "policy-v2").trained_on_forgotten
    log = accounts.audit_log(store)
    assert (log[0]["actor"], log[0]["action"], log[0]["target"]) == (
        "admin",
        "account.forget",
        "ann",
    )
