"""Benchmark: snapshot a feedback store and build the training datasets from it.

Fills a fresh store with N synthetic feedback rows spread over the feedback kinds (plus the
prompts, conversations, messages and responses they refer to), then times `create_snapshot` and
`build_datasets`. Goal: both together under 5 s for 1,000,000 feedback rows.

    python bench/snapshot_datasets.py [--rows 1000000] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb

from tuneloop.core.records import SamplingParams
from tuneloop.feedback.datasets import build_datasets
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.feedback.store import FeedbackStore

T = TypeVar("T")
GOAL_S = 5.0
ANSWERS_PER_PROMPT = 4
RATERS = 1000
# Share of the feedback rows per kind.
MIX = {"thumbs": 0.35, "ratings": 0.20, "edits": 0.10, "comparisons": 0.25, "rankings": 0.10}


def fill(con: duckdb.DuckDBPyConnection, rows: int) -> dict[str, int]:
    """Insert `rows` synthetic feedback rows and what they reference; returns rows per table.

    Prompt JSON and prompt_hash are built exactly as the store builds them (canonical JSON,
    sha256[:16]), so prompt grouping and the held-out split behave as on real data.
    """
    counts = {kind: int(rows * share) for kind, share in MIX.items()}
    counts["thumbs"] += rows - sum(counts.values())
    prompts = max(1, rows // 8)
    n_resp = prompts * ANSWERS_PER_PROMPT
    a = ANSWERS_PER_PROMPT
    params = json.dumps(SamplingParams().to_dict())
    con.execute(
        f"""
        -- a deterministic pseudo-random BIGINT in [0, n)
        CREATE TEMP MACRO pick(i, salt, n) AS (hash(i, salt) % n)::BIGINT;

        INSERT INTO raters
        SELECT 'rater-' || i, CASE WHEN i % 10 = 0 THEN 'rater' ELSE 'user' END, now()
        FROM range({RATERS}) t(i);

        CREATE TEMP TABLE bench_prompts AS
        SELECT p, turns, '[' || array_to_string(list_transform(turns, lambda m:
                   '{{"role":"' || m.role || '","content":"' || m.content || '"}}'), ',')
                   || ']' AS prompt
        FROM (
            SELECT p, CASE WHEN p % 5 = 0
                THEN [{{'role': 'system', 'content': 'You are a concise assistant.'}},
                      {{'role': 'user', 'content': q}}]
                ELSE [{{'role': 'user', 'content': q}}] END AS turns
            FROM (SELECT i + 1 AS p, 'Question ' || (i + 1) || ': how does ' || md5(i::VARCHAR)
                         || ' work, and why?' AS q
                  FROM range({prompts}) t(i))
        );

        INSERT INTO conversations
        SELECT p, 'rater-' || (p % {RATERS}), now() FROM bench_prompts;

        INSERT INTO messages
        SELECT p, generate_subscripts(turns, 1) - 1, unnest(turns).role, unnest(turns).content,
               NULL, now()
        FROM bench_prompts;

        CREATE TEMP TABLE bench_responses AS
        SELECT r.i + 1 AS id, b.p, b.prompt, len(b.turns) AS idx,
               'Answer ' || (r.i + 1) || ' to question ' || b.p || '. ' || md5((r.i + 1)::VARCHAR)
               || ' ' || repeat('The quick brown fox jumps over the lazy dog. ', 1 + r.i % 6)
               AS text
        FROM range({n_resp}) r(i) JOIN bench_prompts b ON b.p = r.i // {a} + 1;

        INSERT INTO messages
        SELECT p, idx, 'assistant', text, id, now() FROM bench_responses;

        INSERT INTO responses
        SELECT id, p, prompt, sha256(prompt)[:16], text, 'bench-model-v1',
               '{params}',
               20 + id % 50, 40 + id % 200, 100 + (id % 900)::DOUBLE, 'stop',
               'rater-' || (p % {RATERS}), now()
        FROM bench_responses;

        INSERT INTO thumbs
        SELECT i + 1, pick(i, 'thumbs', {n_resp}) + 1,
               CASE WHEN pick(i, 'up', 3) = 0 THEN -1 ELSE 1 END,
               'rater-' || (i % {RATERS}), now()
        FROM range({counts["thumbs"]}) t(i);

        INSERT INTO ratings
        SELECT i + 1, pick(i, 'ratings', {n_resp}) + 1, pick(i, 'score', 5) + 1,
               CASE WHEN i % 4 = 0 THEN 'reason ' || i END, 'rater-' || (i % {RATERS}), now()
        FROM range({counts["ratings"]}) t(i);

        INSERT INTO edits
        SELECT i + 1, r, 'Edited answer to response ' || r || ': ' || md5(i::VARCHAR)
               || ' Start with the short version, then the detail.',
               'rater-' || (i % {RATERS}), now()
        FROM (SELECT i, pick(i, 'edits', {n_resp}) + 1 AS r FROM range({counts["edits"]}) t(i));

        INSERT INTO comparisons
        SELECT i + 1, first + x, first + (x + 1 + y) % {a},
               ['a', 'b', 'a', 'b', 'tie', 'both_bad'][pick(i, 'winner', 6) + 1],
               'rater-' || (i % {RATERS}), now()
        FROM (SELECT i, pick(i, 'cmp', {prompts}) * {a} + 1 AS first,
                     pick(i, 'x', {a}) AS x, pick(i, 'y', {a - 1}) AS y
              FROM range({counts["comparisons"]}) t(i));

        INSERT INTO rankings
        SELECT i + 1,
               list_transform(range(k), lambda j: first + (x + j) % {a}),
               'rater-' || (i % {RATERS}), now()
        FROM (SELECT i, pick(i, 'rank', {prompts}) * {a} + 1 AS first,
                     pick(i, 'x', {a}) AS x, 3 + pick(i, 'k', 2) AS k
              FROM range({counts["rankings"]}) t(i));

        DROP TABLE bench_prompts;
        DROP TABLE bench_responses;
        DROP MACRO pick;
        """
    )
    return {"prompts": prompts, "responses": n_resp, **counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="feedback rows to insert")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the store and snapshot go (must not hold a store yet); default: a temp dir",
    )
    args = parser.parse_args(argv)
    if args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as tmp:
            return run(args.rows, Path(tmp))
    return run(args.rows, args.data_dir)


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's result, wall seconds, and CPU seconds of this process (all threads): on a shared
    machine the CPU time shows the work done when the wall time is inflated by other load."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run(rows: int, data_dir: Path) -> int:
    db = data_dir / "feedback.duckdb"
    if db.exists():
        print(f"{db} exists: give a fresh --data-dir", file=sys.stderr)
        return 2
    with FeedbackStore(db) as store:
        filled, fill_s, _ = timed(lambda: store.write(lambda con: fill(con, rows)))
        load = os.getloadavg()[0]
        snap, snap_s, snap_cpu = timed(lambda: create_snapshot(store, data_dir / "snapshots"))
    built, build_s, build_cpu = timed(lambda: build_datasets(snap.path))
    total = snap_s + build_s

    feedback = sum(filled[k] for k in MIX)
    print(f"feedback rows: {feedback:,}  ({', '.join(f'{k} {filled[k]:,}' for k in MIX)})")
    print(
        f"responses: {filled['responses']:,}  prompts: {filled['prompts']:,}  "
        f"cpus: {os.cpu_count()}  load avg before timing: {load:.2f}  duckdb {duckdb.__version__}"
    )
    print(f"fill (not timed against the goal): {fill_s:.2f} s")
    print()
    print(f"{'step':<18}{'wall s':>10}{'cpu s':>10}")
    print(f"{'create_snapshot':<18}{snap_s:>10.2f}{snap_cpu:>10.2f}")
    print(f"{'build_datasets':<18}{build_s:>10.2f}{build_cpu:>10.2f}")
    print(f"{'total':<18}{total:>10.2f}{snap_cpu + build_cpu:>10.2f}")
    print()
    print(f"{'dataset':<12}{'train':>12}{'heldout':>12}")
    for ds in built.values():
        print(f"{ds.name:<12}{ds.train_rows:>12,}{ds.heldout_rows:>12,}")
    print()
    verdict = "met" if total < GOAL_S else "MISSED"
    print(
        f"goal: total < {GOAL_S:.0f} s (wall) for 1,000,000 feedback rows: {verdict} "
        f"({total:.2f} s for {feedback:,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
