"""The rating queue's selection policies on a real DuckDB file: `active` asks first what a judgment
would tell the reward model most (scored by a real reward model in a job process), `random` and
`oldest` for comparison; a canary's tasks keep their order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_rating_queue import answer, make_tasks

from tuneloop.core.config import DataDir
from tuneloop.core.records import Message, ModelVersion, prompt_hash
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.task_scores import save_scores, task_information, tasks_to_score
from tuneloop.feedback.tasks import PRIORITY_CANARY, NewTask, add_tasks, set_gold
from tuneloop.loop.active import score_open_tasks
from tuneloop.serve.task_queue import TaskQueue
from tuneloop.train.task_scores import pair_information
from tuneloop.train.task_scores import task_information as info_of


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "data" / "feedback.duckdb") as s:
        yield s


def order(queue: TaskQueue, n: int) -> list[int]:
    """The tasks as raters r0, r1, ... are handed them, one each."""
    return [queue.next(f"r{i}").task_id for i in range(n)]  # type: ignore[union-attr]


def scores(infos: dict[int, float]) -> dict[int, dict[str, float]]:
    return {tid: {"info": info, "margin": 1.0 - info} for tid, info in infos.items()}


def test_a_judgment_tells_most_where_the_reward_model_is_least_sure() -> None:
    assert pair_information(0.0) == 1.0
    assert pair_information(1.0) == pytest.approx(0.8399, abs=1e-4)  # sigmoid(1) = 0.731
    assert pair_information(30.0) < 1e-9 and pair_information(-30.0) < 1e-9
    assert info_of(["same", "same"], [0.0, 0.0]) == (0.0, 0.0)  # identical answers: nothing
    info, margin = info_of(["a", "b", "c"], [0.0, 0.0, 2.0])  # a ranking: the mean of 3 pairs
    assert margin == 2.0
    assert info == pytest.approx((1.0 + 2 * pair_information(2.0)) / 3)
    assert math.isclose(pair_information(-1.0), pair_information(1.0))


def test_the_selection_orders_the_tasks_not_begun(store: FeedbackStore) -> None:
    tasks = make_tasks(store, 6, overlap=1)
    canary_ids = tuple(answer(store, "canary question") for _ in range(2))
    canary_hash = prompt_hash([Message("user", "canary question")])
    (canary,) = add_tasks(
        store, [NewTask(canary_ids, canary_hash, None, "canary", 1, PRIORITY_CANARY)]
    )
    infos = dict(zip(tasks, [0.1, 0.9, 0.5, 0.95, 0.2], strict=False))  # the last one unscored
    save_scores(store, "reward-v1", scores(infos))
    assert task_information(store) == infos

    oldest = TaskQueue(store, selection="oldest")
    assert order(oldest, 7) == [canary, *tasks]
    active = TaskQueue(store, selection="active")
    active.apply_information(task_information(store))
    # The canary's first; then the most informative; the unscored one last.
    assert order(active, 7) == [canary, tasks[3], tasks[1], tasks[2], tasks[4], tasks[0], tasks[5]]
    shuffled = TaskQueue(store, selection="random", seed=3)
    drawn = order(shuffled, 7)
    assert drawn[0] == canary and sorted(drawn[1:]) == tasks and drawn[1:] != tasks
    with pytest.raises(ValueError, match="a selection is one of oldest, random, active"):
        TaskQueue(store, selection="smart")


def test_new_scores_reorder_a_live_queue(store: FeedbackStore) -> None:
    tasks = make_tasks(store, 4, overlap=1)
    queue = TaskQueue(store, selection="active")
    save_scores(store, "reward-v1", scores(dict(zip(tasks, [0.4, 0.3, 0.2, 0.1], strict=True))))
    queue.apply_information(task_information(store))
    assert queue.upcoming(4) == [(tid, queue.upcoming(4)[i][1]) for i, tid in enumerate(tasks)]
    # A new reward model sees it the other way round: the queue follows at once.
    save_scores(store, "reward-v2", scores(dict(zip(tasks, [0.1, 0.2, 0.3, 0.4], strict=True))))
    queue.apply_information(task_information(store))
    assert [tid for tid, _ in queue.upcoming(4)] == tasks[::-1]


def test_open_tasks_are_scored_by_the_reward_model_in_a_job_process(
    store: FeedbackStore, tmp_path: Path, tiny_model_dir: Path, untrained_reward_dir: Path
) -> None:
    reward_dir = untrained_reward_dir
    data = DataDir(tmp_path / "data")
    assert score_open_tasks(store, data) == 0  # no reward model yet

    tasks = make_tasks(store, 3, overlap=1)
    # Two different answers each (identical ones would tell nothing: information 0).
    store.write(lambda con: con.execute("UPDATE responses SET text = text || ' #' || id"))
    set_gold(store, tasks[2], None, actor="otto")
    gold = make_tasks(store, 1, overlap=1)[0]
    first_answer = store.read("SELECT response_ids FROM tasks WHERE id = ?", [gold])[0]
    set_gold(store, gold, first_answer["response_ids"][0], actor="otto")
    version = ModelVersion("reward-v1", "reward", str(tiny_model_dir), str(reward_dir))
    registry.register_version(store, version)
    registry.promote(store, "reward-v1", reason="test")
    assert sorted(t["id"] for t in tasks_to_score(store, "reward-v1")) == tasks  # not gold

    assert score_open_tasks(store, data) == 3
    found = store.read("SELECT task_id, reward_version, info, margin FROM task_scores")
    assert sorted(r["task_id"] for r in found) == tasks
    for r in found:
        assert r["reward_version"] == "reward-v1"
        assert 0.0 < r["info"] <= 1.0 and r["margin"] >= 0.0
        assert r["info"] == pytest.approx(pair_information(r["margin"]))
    assert score_open_tasks(store, data) == 0  # scored already by this reward model
