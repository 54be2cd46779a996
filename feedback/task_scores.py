"""Task scores in the database: how much a judgment of each open rating task would tell the
reward model (`tuneloop.train.task_scores` computes them, `tuneloop.loop.active` runs it), read
by the rating queue when its selection is `active` (`tuneloop.serve.task_queue`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import duckdb

from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.tasks import PRIORITY_NORMAL, load_tasks, task_answers


def tasks_to_score(store: FeedbackStore, reward_version: str) -> list[dict[str, Any]]:
    """Open tasks of normal priority (a canary's keep their order: the human gate's verdict
    wants an unbiased sample) that `reward_version` has not scored yet: `{"id", "prompt",
    "answers"}` each, as the scoring job reads them."""
    scored = {
        r["task_id"]
        for r in store.read(
            "SELECT task_id FROM task_scores WHERE reward_version = ?", [reward_version]
        )
    }
    wanted = {
        t.id: t.response_ids
        for t in load_tasks(store)
        if t.priority == PRIORITY_NORMAL and not t.gold and t.id not in scored
    }
    found = task_answers(store, wanted)
    return [
        {"id": tid, "prompt": prompt, "answers": [texts[rid] for rid in wanted[tid]]}
        for tid, (prompt, texts) in found.items()
        if all(rid in texts for rid in wanted[tid])
    ]


def save_scores(
    store: FeedbackStore, reward_version: str, scores: dict[int, dict[str, float]]
) -> None:
    """Store (or replace) each task's score by `reward_version`."""
    if not scores:
        return
    now = datetime.now(UTC)
    ids = sorted(scores)

    def upsert(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "INSERT OR REPLACE INTO task_scores "
            "SELECT unnest($ids), $version, unnest($info), unnest($margin), $now",
            {
                "ids": ids,
                "version": reward_version,
                "info": [float(scores[i]["info"]) for i in ids],
                "margin": [float(scores[i]["margin"]) for i in ids],
                "now": now,
            },
        )

    store.write(upsert)


def task_information(store: FeedbackStore) -> dict[int, float]:
    """Each scored task's information, by the reward model that scored it last."""
    rows = store.read("SELECT task_id, info FROM task_scores")
    return {int(r["task_id"]): float(r["info"]) for r in rows}


def scores_version(store: FeedbackStore) -> str:
    """A token that changes whenever scores are written (the queue re-reads them then)."""
    row = store.read("SELECT count(*) AS n, max(scored_at) AS at FROM task_scores")[0]
    return json.dumps([row["n"], str(row["at"])])
