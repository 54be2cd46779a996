"""The server's scheduler: when enough new feedback arrived since the last snapshot, and not
more often than allowed, a training cycle is due."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tuneloop.core.config import DataDir
from tuneloop.core.records import Message, Response, SamplingParams, Thumbs
from tuneloop.core.settings import ScheduleSettings, TrustSettings
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore
from tuneloop.loop.control import LoopControl
from tuneloop.serve.engine import EmbeddedEngine, ServedEngine

# The rows here carry made-up rater names, not accounts: admit them.
ANY_RATER = TrustSettings(anonymous=True)


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def thumbs(store: FeedbackStore, n: int, rater: str = "anonymous") -> None:
    """`n` thumbs up by `rater`, each on an answer of its own (one vote per rater and item)."""
    for _ in range(n):
        rid = store.new_response_id()
        store.submit_response(
            Response(
                id=rid,
                conversation_id=store.new_conversation_id(),
                prompt=(Message("user", "hi"),),
                text="hello",
                model_version_id="policy-v1",
                params=SamplingParams(8, 0.7),
                prompt_tokens=3,
                completion_tokens=1,
                latency_ms=1.0,
            )
        ).result()
        store.record_feedback(Thumbs(rid, 1, rater))


def control(
    tmp_path: Path,
    store: FeedbackStore,
    model: Path,
    trust: TrustSettings = ANY_RATER,
    **schedule: object,
) -> LoopControl:
    # poll_seconds keeps the scheduler's own thread from acting during the test.
    settings = ScheduleSettings(poll_seconds=3600, **schedule)  # type: ignore[arg-type]
    engine = EmbeddedEngine(model, "policy-v1")
    serving = ServedEngine(engine, log=lambda _m: None)
    return LoopControl(
        DataDir(tmp_path), store, serving, schedule=settings, trust=trust, log=lambda _m: None
    )


def test_due_after_enough_new_feedback_since_the_last_snapshot(
    tmp_path: Path, store: FeedbackStore, tiny_model_dir: Path
) -> None:
    ctl = control(tmp_path, store, tiny_model_dir, enabled=True, min_new_feedback=3)
    try:
        thumbs(store, 2)
        assert (ctl.new_feedback_rows(), ctl.schedule_due()) == (2, False)
        thumbs(store, 1)
        assert (ctl.new_feedback_rows(), ctl.schedule_due()) == (3, True)
        create_snapshot(store, tmp_path / "snapshots", ANY_RATER)
        assert (ctl.new_feedback_rows(), ctl.schedule_due()) == (0, False)
        thumbs(store, 3)
        assert ctl.schedule_due()
    finally:
        ctl.close()


def test_not_due_when_off_or_too_soon(
    tmp_path: Path, store: FeedbackStore, tiny_model_dir: Path
) -> None:
    off = control(tmp_path, store, tiny_model_dir, enabled=False, min_new_feedback=1)
    thumbs(store, 5)
    try:
        assert off.new_feedback_rows() == 5 and not off.schedule_due()
    finally:
        off.close()
    soon = control(tmp_path, store, tiny_model_dir, enabled=True, min_new_feedback=1)
    try:
        assert soon.schedule_due()
        soon._last_start = time.monotonic()  # a cycle started just now
        assert not soon.schedule_due()
    finally:
        soon.close()


def test_only_rows_the_trust_policy_admits_count(
    tmp_path: Path, store: FeedbackStore, tiny_model_dir: Path
) -> None:
    from tuneloop.feedback import accounts

    accounts.add_account(store, "ann", "user", actor="admin")
    strict = control(tmp_path, store, tiny_model_dir, TrustSettings(), enabled=True)
    try:
        thumbs(store, 300)  # no account's
        thumbs(store, 2, rater="ann")
        assert strict.new_feedback_rows() == 2 and not strict.schedule_due()  # 200 needed
        accounts.set_disabled(store, "ann", True, actor="admin")
        assert strict.new_feedback_rows() == 0
    finally:
        strict.close()
