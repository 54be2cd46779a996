"""Benchmark: the raters' task queue through the API of a real server.

Two runs of `tuneloop up --no-ui` (a tiny random model; answers are stored rows, so no text is
generated here), each with `--raters` rater accounts fetching and judging at once (one asyncio
client each, one request at a time):
1. `--tasks` comparison tasks queued (100,000 by default): every rater fetches and judges
   `--judgments` tasks; the time of each `GET /v1/tasks/next` is recorded (after each rater's
   first WARMUP).
2. `--drain` tasks: the raters fetch and judge until nothing is left for them.
Then the database (the server stopped) says whether any rater judged a task twice, how many
judgments each task got (at most the overlap; after the drain, exactly it).

Goal (issue: raters' workbench): 20 raters never get a task twice, every task reaches exactly k
judgments, a fetch takes < 50 ms p99 with 100,000 tasks queued.

    python bench/rating_queue.py [--tasks 100000] [--raters 20] [--judgments 100] [--drain 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import duckdb
import httpx
from common import ServerProcess, cpu_seconds, percentile

from tuneloop.core.config import DataDir
from tuneloop.feedback.store import FeedbackStore

GOAL_P99_S = 0.050
WARMUP = 5  # each rater's first fetches are not timed: the server's first requests are cold
OVERLAP = 3


def queue_tasks(data: Path, n: int) -> None:
    """n comparison tasks, each of two stored answers to a prompt of its own (SQL: fast)."""
    with FeedbackStore(DataDir(data).db) as store:

        def fill(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                """
                INSERT INTO responses SELECT
                    i, (i + 1) // 2,
                    '[{"role":"user","content":"question ' || ((i + 1) // 2) || '"}]',
                    'h' || ((i + 1) // 2), 'answer ' || i, 'policy-v1',
                    '{"max_tokens":16,"temperature":0.9,"top_p":1.0}', 4, 4, 1.0, 'stop',
                    'asker', now()
                FROM range(1, ? + 1) r(i)
                """,
                [2 * n],
            )
            con.execute(
                """
                INSERT INTO tasks SELECT
                    t, 'comparison', 'h' || t, [2 * t - 1, 2 * t],
                    (2 * t - 1) || ',' || (2 * t), 'asker', 'traffic', ?, 0, NULL, now()
                FROM range(1, ? + 1) r(t)
                """,
                [OVERLAP, n],
            )

        store.write(fill)


async def rate(
    url: str,
    token: str,
    judgments: int | None,
    fetch_s: list[float],
    judge_s: list[float],
    got: list[int],
) -> None:
    """Fetch and judge `judgments` tasks (None: until none is left), one request at a time."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(url, headers=headers) as http:
        while judgments is None or len(got) < judgments:
            started = time.perf_counter()
            async with http.get("/v1/tasks/next") as resp:
                resp.raise_for_status()
                task = (await resp.json())["task"]
            if len(got) >= WARMUP:
                fetch_s.append(time.perf_counter() - started)
            if task is None:
                return
            winner = "a" if task["task_id"] % 3 else "b"
            judged = f"/v1/tasks/{task['task_id']}/judgment"
            started = time.perf_counter()
            async with http.post(judged, json={"winner": winner}) as resp:
                resp.raise_for_status()
            judge_s.append(time.perf_counter() - started)
            got.append(task["task_id"])


async def rate_all(
    url: str, tokens: dict[str, str], judgments: int | None, fetch_s, judge_s, got
) -> None:
    await asyncio.gather(
        *(
            rate(url, token, judgments, fetch_s, judge_s, got[rater])
            for rater, token in tokens.items()
        )
    )


def run(model: Path, tmp: Path, name: str, tasks: int, raters: int, judgments: int | None):
    data = tmp / name
    started = time.perf_counter()
    queue_tasks(data, tasks)
    filled_s = time.perf_counter() - started
    args = ["--feedback-per-minute", "0", "--task-backlog", "0", "--task-overlap", "3"]
    fetch_s: list[float] = []
    judge_s: list[float] = []
    got: dict[str, list[int]] = {}
    with ServerProcess(model, data, args=args) as server:
        tokens = {}
        for i in range(raters):
            made = httpx.post(
                f"{server.url}/v1/admin/users",
                json={"name": f"rater{i}", "role": "rater"},
                headers=server.auth,
            )
            tokens[f"rater{i}"] = made.raise_for_status().json()["token"]
        got = {rater: [] for rater in tokens}
        started = time.perf_counter()
        cpu = cpu_seconds(server.pid)
        asyncio.run(rate_all(server.url, tokens, judgments, fetch_s, judge_s, got))
        server_cpu = cpu_seconds(server.pid) - cpu
        wall = time.perf_counter() - started
    with duckdb.connect(str(DataDir(data).db), read_only=True) as con:
        per_task = dict(
            con.execute(
                "SELECT n, count(*) FROM (SELECT item, count(*) AS n FROM comparisons "
                "GROUP BY item) GROUP BY n"
            ).fetchall()
        )
        repeats = con.execute(
            "SELECT count(*) FROM (SELECT rater_id, item FROM comparisons "
            "GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall()[0][0]
    twice = sum(len(ids) - len(set(ids)) for ids in got.values())
    fetch_s.sort()
    judge_s.sort()
    judged = sum(len(ids) for ids in got.values())
    print(
        f"{name}: {tasks:,} tasks queued ({filled_s:.1f} s to fill), {raters} raters, "
        f"{judged:,} judgments in {wall:.1f} s ({judged / wall:,.0f}/s)"
    )
    print(
        f"  fetch: p50 {percentile(fetch_s, 50) * 1000:.1f} ms, "
        f"p99 {percentile(fetch_s, 99) * 1000:.1f} ms, max {fetch_s[-1] * 1000:.1f} ms "
        f"over {len(fetch_s):,} fetches; judgment: p50 {percentile(judge_s, 50) * 1000:.1f} ms, "
        f"p99 {percentile(judge_s, 99) * 1000:.1f} ms; server CPU "
        f"{server_cpu / max(1, len(fetch_s) + judged) * 1000:.2f} ms per request"
    )
    print(
        f"  judgments per task: {dict(sorted(per_task.items()))}; a task given to one rater "
        f"twice: {twice}; stored twice: {repeats}"
    )
    return fetch_s, per_task, twice + repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--judgments", type=int, default=100, help="per rater, in run 1")
    parser.add_argument("--drain", type=int, default=300, help="tasks of run 2")
    args = parser.parse_args(argv)
    from tuneloop.train.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
        model = build_tiny_model(Path(tmp) / "model", seed=0)
        fetch_s, per_task, twice = run(
            model, Path(tmp), "queued", args.tasks, args.raters, args.judgments
        )
        _, drained, twice_drained = run(model, Path(tmp), "drain", args.drain, args.raters, None)
    p99 = percentile(fetch_s, 99)
    exactly_k = set(drained) == {OVERLAP} and drained[OVERLAP] == args.drain
    never_more = max(per_task) <= OVERLAP
    met = p99 < GOAL_P99_S and exactly_k and never_more and twice + twice_drained == 0
    print(
        f"goal: no task twice to a rater, every drained task exactly {OVERLAP} judgments, "
        f"fetch p99 < {GOAL_P99_S * 1000:.0f} ms with {args.tasks:,} queued: "
        f"{'met' if met else 'MISSED'} (p99 {p99 * 1000:.1f} ms)"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
