"""The `active` rating queue on a real server (127.0.0.1): the operator scores the open tasks
with the promoted reward model (a job process), and raters get the most informative first."""

from __future__ import annotations

from pathlib import Path

import duckdb
import httpx
from live_server import live_server

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.core.settings import TaskSettings
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore


def test_raters_get_the_most_informative_task_first(
    tmp_path: Path, tiny_model_dir: Path, untrained_reward_dir: Path
) -> None:
    reward_dir = untrained_reward_dir
    data = tmp_path / "data"
    with FeedbackStore(DataDir(data).db) as store:
        version = ModelVersion("reward-v1", "reward", str(tiny_model_dir), str(reward_dir))
        registry.register_version(store, version)
        registry.promote(store, "reward-v1", reason="the test's reward model")
    tasks = TaskSettings(backlog=0, selection="active")
    for server in live_server(data, tiny_model_dir, ui=False, tasks=tasks):
        operator = server.account("otto", "operator")
        rater = server.account("rae", "rater")
        prompts = [f"Name a fruit, {i}." for i in range(6)]
        body = {"source": "prompts", "prompts": prompts, "overlap": 1}
        made = httpx.post(f"{server.url}/v1/admin/tasks", json=body, headers=operator, timeout=120)
        assert made.status_code == 201
        scored = httpx.post(f"{server.url}/v1/admin/tasks/score", headers=operator, timeout=300)
        assert scored.json() == {"scored": 6, "selection": "active", "reordered": True}
        with duckdb.connect(str(server.data_dir.db)) as con:
            info = dict(con.execute("SELECT task_id, info FROM task_scores").fetchall())
        assert len(info) == 6
        got = httpx.get(f"{server.url}/v1/tasks/next", headers=rater).json()["task"]
        assert info[got["task_id"]] == max(info.values())
        assert httpx.post(f"{server.url}/v1/admin/tasks/score", headers=rater).status_code == 403
