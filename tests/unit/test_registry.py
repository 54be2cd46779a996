"""The registry of model versions and the training-run rows, on a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.runs import (
    fail_interrupted_runs,
    finish_run,
    get_run,
    list_runs,
    start_run,
    update_run,
)
from tuneloop.feedback.store import FeedbackStore


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "feedback.duckdb") as s:
        yield s


def add(store: FeedbackStore, kind: str = "policy", **fields: object) -> ModelVersion:
    vid = registry.next_version_id(store, kind)
    return registry.register_version(
        store, ModelVersion(id=vid, kind=kind, base="base", artifact_path=f"/m/{vid}", **fields)
    )


def statuses(store: FeedbackStore) -> dict[str, str]:
    return {v.id: v.status for v in registry.list_versions(store)}


def test_promote_retires_the_previous_one_and_records_history(store: FeedbackStore) -> None:
    v1, v2 = add(store), add(store, parent="policy-v1", metrics={"loss": 0.5})
    assert registry.promote(store, v1.id, reason="first") is None
    assert registry.promote(store, v2.id, reason="gate: win rate 0.7").id == v1.id
    assert statuses(store) == {"policy-v1": "retired", "policy-v2": "promoted"}
    served = registry.promoted_version(store)
    assert served.status_reason == "gate: win rate 0.7" and served.metrics == {"loss": 0.5}
    history = store.read("SELECT * FROM promotions WHERE kind = 'policy' ORDER BY id DESC")
    assert [(h["version_id"], h["previous_version_id"], h["action"]) for h in history] == [
        ("policy-v2", "policy-v1", "promote"),
        ("policy-v1", None, "promote"),
    ]
    with pytest.raises(registry.RegistryError, match="already the promoted"):
        registry.promote(store, v2.id, reason="again")
    with pytest.raises(registry.UnknownVersionError, match="unknown model version 'nope'"):
        registry.promote(store, "nope", reason="x")


def test_rollback_walks_back_and_never_returns_to_a_rolled_back_version(
    store: FeedbackStore,
) -> None:
    for _ in range(3):
        registry.promote(store, add(store).id, reason="next")
    target = registry.rollback_target(store)
    assert target.id == "policy-v2"
    registry.promote(store, target.id, reason="operator", action="rollback")
    assert statuses(store) == {
        "policy-v1": "retired",
        "policy-v2": "promoted",
        "policy-v3": "rejected",
    }
    assert registry.get_version(store, "policy-v3").status_reason.startswith("rollback")
    assert registry.rollback_target(store).id == "policy-v1"
    registry.promote(store, "policy-v1", reason="operator", action="rollback")
    with pytest.raises(registry.RegistryError, match="no earlier policy version"):
        registry.rollback_target(store)


def test_reward_and_policy_promotions_are_independent(store: FeedbackStore) -> None:
    policy, reward = add(store), add(store, kind="reward")
    registry.promote(store, policy.id, reason="p")
    registry.promote(store, reward.id, reason="r")
    assert registry.promoted_version(store, "policy").id == "policy-v1"
    assert registry.promoted_version(store, "reward").id == "reward-v1"


def test_reject_and_metrics_merge(store: FeedbackStore) -> None:
    v = add(store, metrics={"loss": 1.0})
    registry.update_metrics(store, v.id, {"gate": {"win_rate": 0.4}})
    registry.reject(store, v.id, "gate: win rate 0.40 is under the bar 0.55")
    got = registry.get_version(store, v.id)
    assert got.metrics == {"loss": 1.0, "gate": {"win_rate": 0.4}}
    assert (got.status, got.status_reason) == (
        "rejected",
        "gate: win rate 0.40 is under the bar 0.55",
    )


def test_runs_progress_finish_fail_and_interrupted(store: FeedbackStore) -> None:
    a = start_run(store, "dpo", snapshot_id="snap-1", config={"beta": 0.1}, trigger="cli")
    update_run(store, a.id, progress=0.5, stage="training")
    assert (get_run(store, a.id).progress, get_run(store, a.id).stage) == (0.5, "training")
    finish_run(store, a.id, version_id="policy-v2", metrics={"loss": 0.3})
    done = get_run(store, a.id)
    assert (done.status, done.progress, done.version_id, done.metrics) == (
        "done",
        1.0,
        "policy-v2",
        {"loss": 0.3},
    )
    b = start_run(store, "rm")
    finish_run(store, b.id, error="no preference pairs in the train split")
    c = start_run(store, "gate")
    assert fail_interrupted_runs(store) == 1
    by_id = {r.id: r for r in list_runs(store)}
    assert by_id[b.id].status == "failed" and "no preference pairs" in by_id[b.id].error
    assert by_id[c.id].status == "failed" and by_id[c.id].error.startswith("interrupted")
