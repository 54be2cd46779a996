"""The Operator tab's view functions on a real store: tables, plot frames, volume buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.core.records import (
    Comparison,
    Message,
    ModelVersion,
    Rating,
    Response,
    SamplingParams,
    Thumbs,
)
from tuneloop.feedback import registry
from tuneloop.feedback.runs import finish_run, list_runs, start_run, update_run
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.ui_operator import (
    feedback_volume,
    gate_frame,
    job_html,
    last_cycle_markdown,
    promote_choices,
    reward_accuracy_frame,
    runs_frame,
    status_markdown,
    versions_frame,
    volume_bucket,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ROWS = {"thumbs": 12, "rating": 3, "edit": 0, "comparison": 4, "ranking": 0}
GATE = {
    "win_rate": 0.6,
    "ci_low": 0.45,
    "ci_high": 0.74,
    "wins": 30,
    "ties": 0,
    "losses": 20,
    "prompts": 50,
    "kl_to_parent": 0.0123,
    "promote": True,
    "reason": "win rate 0.60 clears the bar 0.55",
    "incumbent": "policy-v1",
    "reward_model": "reward-v2",
}


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def add_version(store: FeedbackStore, id: str, minutes: int, **fields: object) -> None:
    kind = "reward" if id.startswith("reward") else "policy"
    registry.register_version(
        store,
        ModelVersion(
            id=id,
            kind=kind,  # type: ignore[arg-type]
            base="tiny",
            artifact_path=f"/models/{id}",
            created_at=T0 + timedelta(minutes=minutes),
            **fields,  # type: ignore[arg-type]
        ),
    )


@pytest.fixture
def versions(store: FeedbackStore) -> list[ModelVersion]:
    """The demo base, two reward models, a promoted and a rejected candidate; newest first."""
    add_version(store, "policy-v1", 0)
    registry.promote(store, "policy-v1", reason="served by `tuneloop up`")
    for i, acc in ((1, 0.7), (2, 0.85)):
        metrics = {"heldout_accuracy": acc, "heldout_pairs": 20 * i, "feedback_rows": ROWS}
        add_version(store, f"reward-v{i}", 10 * i, snapshot_id=f"snap-{i}", metrics=metrics)
        registry.promote(store, f"reward-v{i}", reason="newest reward model")
    add_version(
        store,
        "policy-v2",
        15,
        parent="policy-v1",
        snapshot_id="snap-1",
        config={"job": "dpo"},
        metrics={"feedback_rows": ROWS, "data": {"pairs": 19}, "gate": GATE},
    )
    registry.promote(store, "policy-v2", reason="gate: win rate 0.60 clears the bar 0.55")
    rejected = GATE | {"win_rate": 0.4, "ci_low": 0.3, "ci_high": 0.5, "kl_to_parent": None}
    rejected |= {"length_ratio": 2.5}
    add_version(
        store,
        "policy-v3",
        25,
        parent="policy-v2",
        snapshot_id="snap-2",
        config={"job": "kto"},
        metrics={"feedback_rows": dict.fromkeys(ROWS, 0), "gate": rejected},
    )
    registry.reject(store, "policy-v3", "gate: win rate 0.40 is below the bar 0.55")
    return registry.list_versions(store)


def test_versions_table_shows_provenance_and_metrics(versions: list[ModelVersion]) -> None:
    frame = versions_frame(versions).set_index("id")
    assert list(frame.index) == ["policy-v3", "reward-v2", "policy-v2", "reward-v1", "policy-v1"]
    v2 = frame.loc["policy-v2"]
    assert (v2["kind"], v2["job"], v2["status"], v2["parent"], v2["snapshot"]) == (
        "policy",
        "dpo",
        "promoted",
        "policy-v1",
        "snap-1",
    )
    assert v2["reason"] == "gate: win rate 0.60 clears the bar 0.55"
    assert v2["feedback rows"] == "thumbs 12 · rating 3 · comparison 4"
    assert (v2["win rate"], v2["95% CI"], v2["KL to parent"]) == ("0.600", "[0.45, 0.74]", "0.012")
    assert v2["RM accuracy"] == ""
    v3 = frame.loc["policy-v3"]
    assert (v3["status"], v3["win rate"], v3["KL to parent"]) == ("rejected", "0.400", "unknown")
    assert (v3["length vs served"], v2["length vs served"]) == ("2.50x", "")
    assert v3["feedback rows"] == "none"
    assert frame.loc["reward-v2", "RM accuracy"] == "0.850"
    assert frame.loc["reward-v2", "created (UTC)"] == "2026-11-23 10:20"
    # The demo base has no metrics at all: blanks, no errors.
    base = frame.loc["policy-v1"]
    assert base["status"] == "retired"
    assert [base[c] for c in ("feedback rows", "RM accuracy", "win rate", "KL to parent")] == [
        ""
    ] * 4


def test_plot_frames_hold_the_metrics_oldest_first(versions: list[ModelVersion]) -> None:
    rm = reward_accuracy_frame(versions)
    assert rm.to_dict("records") == [
        {"version": "reward-v1", "accuracy": 0.7, "pairs": 20},
        {"version": "reward-v2", "accuracy": 0.85, "pairs": 40},
    ]
    gate = gate_frame(versions)
    assert gate.values.tolist() == [
        ["policy-v2", "win rate", 0.6],
        ["policy-v2", "CI low", 0.45],
        ["policy-v2", "CI high", 0.74],
        ["policy-v3", "win rate", 0.4],
        ["policy-v3", "CI low", 0.3],
        ["policy-v3", "CI high", 0.5],
    ]
    assert reward_accuracy_frame([]).empty and gate_frame([]).empty


def test_promote_choices_leave_out_promoted_versions(versions: list[ModelVersion]) -> None:
    assert promote_choices(versions) == [
        ("policy-v3 (policy, rejected)", "policy-v3"),
        ("reward-v1 (reward, retired)", "reward-v1"),
        ("policy-v1 (policy, retired)", "policy-v1"),
    ]


def test_running_job_shows_its_progress_and_runs_table_its_outcome(store: FeedbackStore) -> None:
    assert "No job runs" in job_html([], busy=False)
    assert "starting" in job_html([], busy=True)
    failed = start_run(store, "rm", version_id="reward-v1")
    finish_run(store, failed.id, error="no preference pairs in the snapshot")
    done = start_run(store, "rm", version_id="reward-v2")
    finish_run(store, done.id, version_id="reward-v2")
    running = start_run(store, "dpo", version_id="policy-v2", trigger="schedule")
    update_run(store, running.id, progress=0.456, stage="training")
    runs = list_runs(store)

    shown = job_html(runs, busy=True)
    assert 'aria-valuenow="46"' in shown and "width:46%" in shown
    assert "<b>dpo</b> · training · 46%" in shown and "policy-v2" in shown
    frame = runs_frame(runs).set_index("run")
    assert frame.loc[running.id, ["status", "stage", "progress", "trigger", "took"]].tolist() == [
        "running",
        "training",
        "46%",
        "schedule",
        "",
    ]
    assert frame.loc[done.id, ["status", "progress", "version"]].tolist() == [
        "done",
        "100%",
        "reward-v2",
    ]
    assert frame.loc[failed.id, "error"] == "no preference pairs in the snapshot"
    assert frame.loc[failed.id, "took"].endswith(" s")


def test_status_names_both_versions_when_they_differ() -> None:
    status = {
        "served_version": "policy-v2",
        "registry_promoted": "policy-v3",
        "busy": False,
        "last_cycle": None,
        "schedule": {
            "enabled": True,
            "min_new_feedback": 200,
            "every_minutes": 30.0,
            "kind": "kto",
        },
        "new_feedback_rows": 17,
    }
    text = status_markdown(status)
    assert "Serving model version **policy-v2**" in text
    assert "registry's promoted policy is **policy-v3**" in text
    assert "**kto** once 200 new feedback rows" in text and "every 30 min" in text
    assert "**17** feedback rows since the last snapshot" in text
    same = status | {"registry_promoted": "policy-v2", "schedule": {"enabled": False}}
    assert "registry" not in status_markdown(same)
    assert "Scheduled training is off." in status_markdown(same)


def test_last_cycle_outcomes() -> None:
    assert "No training cycle" in last_cycle_markdown(None)
    base = {"kind": "dpo", "trigger": "operator", "finished_at": "2026-11-23T10:05:00+00:00"}
    failed = base | {"status": "failed", "error": "job dpo failed: out of memory"}
    assert last_cycle_markdown(failed).endswith("**failed**: job dpo failed: out of memory")
    assert "2026-11-23 10:05:00" in last_cycle_markdown(failed)
    done = base | {"status": "done", "candidate_version": "policy-v3", "gate": GATE}
    rejected = done | {"promoted": False, "reason": "win rate 0.40 is below the bar 0.55"}
    assert "**policy-v3** rejected: win rate 0.40 is below the bar 0.55" in last_cycle_markdown(
        rejected
    )
    promoted = done | {"promoted": True, "reason": GATE["reason"]}
    assert f"**policy-v3** promoted: {GATE['reason']}" in last_cycle_markdown(promoted)
    rm = base | {"kind": "rm", "status": "done", "reward_version": "reward-v4", "promoted": True}
    assert "reward model **reward-v4** trained" in last_cycle_markdown(rm)


def respond(store: FeedbackStore, prompt: str = "What is a list?") -> int:
    response = Response(
        id=store.new_response_id(),
        conversation_id=store.new_conversation_id(),
        prompt=(Message("user", prompt),),
        text="An answer",
        model_version_id="policy-v1",
        params=SamplingParams(64, 0.7, 1.0),
        prompt_tokens=12,
        completion_tokens=5,
        latency_ms=30.0,
    )
    return store.submit_response(response).result()


def set_time(store: FeedbackStore, table: str, row_id: int, when: datetime) -> None:
    store.write(
        lambda con: con.execute(f"UPDATE {table} SET created_at = ? WHERE id = ?", [when, row_id])
    )


def counts(frame: pd.DataFrame) -> list[tuple[str, str, int]]:
    return [(t.strftime("%Y-%m-%d %H:%M"), k, n) for t, k, n in frame.itertuples(index=False)]


def test_feedback_volume_counts_rows_per_bucket_and_kind(store: FeedbackStore) -> None:
    frame, bucket = feedback_volume(store)
    assert frame.empty and bucket == "minute"
    a, b = respond(store), respond(store)
    placed = [
        ("thumbs", store.record_feedback(Thumbs(a, 1)), T0 + timedelta(seconds=10)),
        ("thumbs", store.record_feedback(Thumbs(b, -1)), T0 + timedelta(seconds=50)),
        ("ratings", store.record_feedback(Rating(a, 4)), T0 + timedelta(seconds=30)),
        ("thumbs", store.record_feedback(Thumbs(a, -1, "ben")), T0 + timedelta(minutes=2)),
        ("comparisons", store.record_feedback(Comparison(a, b, "a")), T0 + timedelta(hours=2)),
    ]
    for table, row_id, when in placed:
        set_time(store, table, row_id, when)
    frame, bucket = feedback_volume(store)
    assert bucket == "minute"
    assert counts(frame) == [
        ("2026-11-23 10:00", "rating", 1),
        ("2026-11-23 10:00", "thumbs", 2),
        ("2026-11-23 10:02", "thumbs", 1),
        ("2026-11-23 12:00", "comparison", 1),
    ]
    assert frame["rows"].sum() == len(placed)

    set_time(store, "comparisons", placed[-1][1], T0 + timedelta(days=1, minutes=30))
    frame, bucket = feedback_volume(store)
    assert bucket == "hour"
    assert counts(frame) == [
        ("2026-11-23 10:00", "rating", 1),
        ("2026-11-23 10:00", "thumbs", 3),
        ("2026-11-24 10:00", "comparison", 1),
    ]

    set_time(store, "comparisons", placed[-1][1], T0 + timedelta(days=30))
    assert feedback_volume(store)[1] == "day"


def test_volume_bucket_follows_the_time_span() -> None:
    assert volume_bucket(timedelta(0)) == "minute"
    assert volume_bucket(timedelta(hours=3)) == "minute"
    assert volume_bucket(timedelta(hours=3, seconds=1)) == "hour"
    assert volume_bucket(timedelta(days=7)) == "hour"
    assert volume_bucket(timedelta(days=8)) == "day"
