"""Rating tasks in the database: answers to one prompt that raters judge blind.

A task names its answers (stored responses to one prompt), how many raters must judge it
(`overlap`), and who asked the prompt (its `author`, never given the task). A judgment is an
ordinary vote, a comparison or a ranking of exactly those answers, so a task's `item` is the vote
item of its answers (`validation.vote_item`): a task is done once `overlap` raters other than
its author voted on it, and one rater's second vote replaces the first. What is handed to whom,
and when, is the serving process's business (`tuneloop.serve.task_queue`); skips are stored so
that a restart does not hand a skipped task back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import duckdb

from tuneloop.core.records import Comparison, Ranking
from tuneloop.core.settings import MAX_TASK_ANSWERS, TrustSettings
from tuneloop.feedback.accounts import write_audit
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.trust import TRUSTED_SOURCES, admitted
from tuneloop.feedback.validation import FeedbackError, vote_item

TaskKind = Literal["comparison", "ranking"]
DEFAULT_OVERLAP = 3
# Tasks with a larger priority are handed out first: a canary's, which the human gate waits for.
PRIORITY_NORMAL = 0
PRIORITY_CANARY = 10


@dataclass(frozen=True)
class NewTask:
    """A task to store: `response_ids` in the order they were made (the queue shuffles them)."""

    response_ids: tuple[int, ...]
    prompt_hash: str
    author: str | None
    source: str
    overlap: int = DEFAULT_OVERLAP
    priority: int = PRIORITY_NORMAL

    @property
    def kind(self) -> TaskKind:
        return "comparison" if len(self.response_ids) == 2 else "ranking"

    @property
    def item(self) -> str:
        ids = self.response_ids
        fb = Comparison(ids[0], ids[1], "tie") if len(ids) == 2 else Ranking(ids)
        return vote_item(fb)


@dataclass(frozen=True)
class Task:
    """A stored task, with who has judged or skipped it so far."""

    id: int
    kind: TaskKind
    prompt_hash: str
    response_ids: tuple[int, ...]
    item: str
    author: str | None
    source: str
    overlap: int
    priority: int
    gold_response_id: int | None
    judged_by: frozenset[str] = field(default_factory=frozenset)
    skipped_by: frozenset[str] = field(default_factory=frozenset)

    @property
    def gold(self) -> bool:
        return self.gold_response_id is not None


# Votes on a task: of its kind, on its item, by anyone but its author.
_JUDGMENTS = """
    SELECT t.id AS task_id, v.rater_id
    FROM tasks t
    JOIN (
        SELECT 'comparison' AS kind, item, rater_id FROM comparisons
        UNION ALL SELECT 'ranking', item, rater_id FROM rankings
    ) v ON v.kind = t.kind AND v.item = t.item AND v.rater_id IS DISTINCT FROM t.author
"""


def add_tasks(store: FeedbackStore, new: Sequence[NewTask]) -> list[int]:
    """Store tasks; returns the ids of those stored (a task of answers that already have one is
    left out). Its answers must exist and answer one prompt."""
    if not new:
        return []
    for task in new:
        ids = task.response_ids
        if not 2 <= len(ids) <= MAX_TASK_ANSWERS or len(set(ids)) != len(ids):
            raise FeedbackError(f"a task has 2 to {MAX_TASK_ANSWERS} different answers")
        if task.overlap < 1:
            raise FeedbackError("a task's overlap is at least 1")

    def insert(con: duckdb.DuckDBPyConnection) -> list[int]:
        wanted = sorted({rid for t in new for rid in t.response_ids})
        found = dict(
            con.execute(
                "SELECT id, prompt_hash FROM responses WHERE id IN (SELECT unnest(?::BIGINT[]))",
                [wanted],
            ).fetchall()
        )
        for task in new:
            hashes = {found.get(rid) for rid in task.response_ids}
            if hashes != {task.prompt_hash}:
                raise FeedbackError(
                    f"task answers {list(task.response_ids)} are unknown or answer other prompts"
                )
        start = con.execute("SELECT coalesce(max(id), 0) + 1 FROM tasks").fetchone()[0]
        now = datetime.now(UTC)
        rows = [
            [
                start + i,
                t.kind,
                t.prompt_hash,
                list(t.response_ids),
                t.item,
                t.author,
                t.source,
                t.overlap,
                t.priority,
                None,
                now,
            ]
            for i, t in enumerate(new)
        ]
        cols = list(zip(*rows, strict=True))
        select = ", ".join(f"unnest(${i + 1})" for i in range(len(cols)))
        stored = con.execute(
            f"INSERT INTO tasks SELECT {select} ON CONFLICT DO NOTHING RETURNING id",
            [list(c) for c in cols],
        ).fetchall()
        return sorted(tid for (tid,) in stored)

    return store.write(insert)


def load_tasks(
    store: FeedbackStore, *, open_only: bool = True, task_id: int | None = None
) -> list[Task]:
    """Tasks with who judged and skipped each, oldest first; `open_only`: those still wanting
    judgments (gold tasks always do: every rater gets each once); `task_id`: that one only."""
    having = "HAVING t.gold_response_id IS NOT NULL OR count(j.rater_id) < t.overlap"
    where = f"WHERE t.id = {int(task_id)}" if task_id is not None else ""
    rows = store.read(
        f"""
        WITH j AS ({_JUDGMENTS}),
        s AS (SELECT task_id, list(rater_id) AS skipped FROM task_skips GROUP BY task_id)
        SELECT t.id, t.kind, t.prompt_hash, t.response_ids, t.item, t.author, t.source,
               t.overlap, t.priority, t.gold_response_id,
               list(j.rater_id) FILTER (WHERE j.rater_id IS NOT NULL) AS judged,
               any_value(s.skipped) AS skipped
        FROM tasks t LEFT JOIN j ON j.task_id = t.id LEFT JOIN s ON s.task_id = t.id
        {where}
        GROUP BY ALL {having if open_only else ""}
        ORDER BY t.id
        """
    )
    return [
        Task(
            id=r["id"],
            kind=r["kind"],
            prompt_hash=r["prompt_hash"],
            response_ids=tuple(r["response_ids"]),
            item=r["item"],
            author=r["author"],
            source=r["source"],
            overlap=r["overlap"],
            priority=r["priority"],
            gold_response_id=r["gold_response_id"],
            judged_by=frozenset(r["judged"] or ()),
            skipped_by=frozenset(r["skipped"] or ()),
        )
        for r in rows
    ]


def judgments_by_rater(store: FeedbackStore) -> dict[str, int]:
    """How many tasks each rater has judged."""
    rows = store.read(f"SELECT rater_id, count(*) AS n FROM ({_JUDGMENTS}) GROUP BY rater_id")
    return {r["rater_id"]: int(r["n"]) for r in rows}


def task_answers(
    store: FeedbackStore, tasks: dict[int, Sequence[int]]
) -> dict[int, tuple[list[dict[str, Any]], dict[int, str]]]:
    """For each task (its id: its response ids), the prompt's messages as stored and each
    answer's text, in one query (a query costs ~1 ms however few rows it reads)."""
    wanted = sorted({rid for ids in tasks.values() for rid in ids})
    rows = store.read(
        "SELECT id, prompt, text FROM responses WHERE id IN (SELECT unnest(?::BIGINT[]))",
        [wanted],
    )
    found = {r["id"]: r for r in rows}
    answers = {}
    for task_id, ids in tasks.items():
        present = [found[rid] for rid in ids if rid in found]
        if present:
            prompt = json.loads(present[0]["prompt"])
            answers[task_id] = (prompt, {r["id"]: r["text"] for r in present})
    return answers


def task_detail(store: FeedbackStore, task_id: int) -> dict[str, Any] | None:
    """A task for an operator: its answers with their ids and versions, and every vote on it."""
    found = load_tasks(store, open_only=False, task_id=task_id)
    if not found:
        return None
    task = found[0]
    answers = store.read(
        "SELECT id, model_version_id AS version, text FROM responses "
        "WHERE id IN (SELECT unnest(?::BIGINT[])) ORDER BY id",
        [list(task.response_ids)],
    )
    prompt = task_answers(store, {task.id: task.response_ids})[task.id][0]
    return {
        "id": task.id,
        "kind": task.kind,
        "source": task.source,
        "author": task.author,
        "overlap": task.overlap,
        "gold_response_id": task.gold_response_id,
        "prompt": prompt,
        "answers": answers,
        "judged_by": sorted(task.judged_by),
        "skipped_by": sorted(task.skipped_by),
    }


def record_skip(store: FeedbackStore, task_id: int, rater: str) -> None:
    store.write(
        lambda con: con.execute(
            "INSERT INTO task_skips VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [task_id, rater, datetime.now(UTC)],
        )
    )


def set_gold(store: FeedbackStore, task_id: int, response_id: int | None, *, actor: str) -> None:
    """Make a task gold with `response_id` as its known best answer (None: not gold again)."""

    def update(con: duckdb.DuckDBPyConnection) -> None:
        found = con.execute("SELECT response_ids FROM tasks WHERE id = ?", [task_id]).fetchall()
        if not found:
            raise KeyError(f"no task {task_id}")
        if response_id is not None and response_id not in found[0][0]:
            raise FeedbackError(
                f"response {response_id} is not one of task {task_id}'s answers {found[0][0]}"
            )
        con.execute("UPDATE tasks SET gold_response_id = ? WHERE id = ?", [response_id, task_id])
        write_audit(con, actor, "task.gold", str(task_id), {"response_id": response_id})

    store.write(update)


def task_counts(store: FeedbackStore) -> dict[str, int]:
    """How many tasks there are: in all, done, open, gold, and the judgments given."""
    row = store.read(
        f"""
        WITH j AS (SELECT task_id, count(*) AS n FROM ({_JUDGMENTS}) GROUP BY task_id)
        SELECT count(*) AS tasks,
               count(*) FILTER (WHERE coalesce(j.n, 0) >= t.overlap) AS done,
               count(*) FILTER (WHERE coalesce(j.n, 0) < t.overlap) AS open,
               count(*) FILTER (WHERE t.gold_response_id IS NOT NULL) AS gold,
               coalesce(sum(j.n), 0) AS judgments
        FROM tasks t LEFT JOIN j ON j.task_id = t.id
        """
    )[0]
    return {k: int(v) for k, v in row.items()}


@dataclass(frozen=True)
class TrafficPrompt:
    """A prompt from real traffic with no task yet, and the answer it was given."""

    response_id: int
    conversation_id: int
    prompt: list[dict[str, Any]]
    prompt_hash: str
    author: str
    version_id: str


def traffic_prompts(store: FeedbackStore, limit: int) -> list[TrafficPrompt]:
    """The newest prompts people in good standing asked that no task holds yet, one answer
    each (the first one given). Imported rows are not traffic."""
    sources = ", ".join(f"'{name}'" for name in TRUSTED_SOURCES)
    rows = store.read(
        f"""
        SELECT min(id) AS response_id, arg_min(conversation_id, id) AS conversation_id,
               arg_min(prompt, id) AS prompt, prompt_hash, arg_min(rater_id, id) AS author,
               arg_min(model_version_id, id) AS version_id
        FROM responses
        WHERE rater_id NOT IN ({sources}) AND {admitted(TrustSettings())}
          AND prompt_hash NOT IN (SELECT prompt_hash FROM tasks)
        GROUP BY prompt_hash
        ORDER BY response_id DESC
        LIMIT ?
        """,
        [limit],
    )
    return [
        TrafficPrompt(
            r["response_id"],
            r["conversation_id"],
            json.loads(r["prompt"]),
            r["prompt_hash"],
            r["author"],
            r["version_id"],
        )
        for r in rows
    ]
