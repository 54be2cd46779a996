"""The rating queue's `active` selection: scores the open tasks with the current reward model
(`tuneloop.train.task_scores`, a process of its own, as every job) and stores what a judgment
of each would tell it (`feedback.task_scores`); the serving process re-reads the scores and
orders its queue by them (`serve.rating_desk.RatingDesk.follow_scores`).

Scores are refreshed as judgments arrive in the sense that matters: each new reward model (a
training cycle) scores every open task again, and each new task is scored at the next poll;
tasks judged enough leave the queue whatever their score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tuneloop.core.config import DataDir
from tuneloop.core.files import write_json_atomic
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.task_scores import save_scores, tasks_to_score

# A scoring run that takes longer is given up (the next poll tries again).
SCORING_TIMEOUT_S = 1800


def score_open_tasks(
    store: FeedbackStore,
    data_dir: DataDir,
    *,
    python: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> int:
    """Score the open tasks the promoted reward model has not scored yet; how many it scored
    (0 without a reward model or such tasks). A failed run is logged and scores nothing."""
    reward = registry.promoted_version(store, "reward")
    if reward is None:
        return 0
    tasks = tasks_to_score(store, reward.id)
    if not tasks:
        return 0
    work = data_dir.runs / "task-scores"
    given, out, log_file = work / "tasks.json", work / "scores.json", work / "job.log"
    write_json_atomic(given, {"reward_model": reward.artifact_path, "tasks": tasks})
    out.unlink(missing_ok=True)
    argv = [python or sys.executable, "-m", "tuneloop.train.task_scores", str(given), str(out)]
    with log_file.open("ab") as job_log:
        try:
            done = subprocess.run(
                argv, stdout=job_log, stderr=subprocess.STDOUT, timeout=SCORING_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            log(f"scoring {len(tasks)} rating tasks took over {SCORING_TIMEOUT_S} s: given up")
            return 0
    if done.returncode != 0 or not out.exists():
        log(f"scoring rating tasks failed (exit {done.returncode}); see {log_file}")
        return 0
    scores = {int(k): v for k, v in json.loads(Path(out).read_text())["scores"].items()}
    save_scores(store, reward.id, scores)
    log(f"scored {len(scores)} rating tasks with {reward.id}")
    return len(scores)
