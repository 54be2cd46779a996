"""The whole loop in one test, on each engine: `tuneloop simulate` on a demo model built here.
Simulated users chat through the API, simulated raters compare answers, the server trains a
reward model and DPO, gates the candidate, promotes it and hot-swaps; the new version must beat
the baseline on held-out questions by the raters' own preference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def demo() -> Path:
    """The demo model users get (`--model demo`), from the per-user cache: built once with its
    full time budget. (One built here with a shorter budget learned too little on a busy
    machine for the win-rate bar.)"""
    from tuneloop.models import resolve_model

    return Path(resolve_model("demo"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["embedded", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_simulate_learns_the_raters_preference_end_to_end(
    tmp_path: Path, demo: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    engine_args = ["--engine", engine]
    if engine == "vllm":
        engine_args += ["--vllm-python", request.getfixturevalue("vllm_python")]
    data_dir = tmp_path / "sim"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "simulate",
            "--data-dir",
            str(data_dir),
            "--model",
            str(demo),
            "--preference",
            "concise",
            "--comparisons",
            "600",
            "--heldout",
            "32",
            "--samples",
            "4",
            *engine_args,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # 600 comparisons, as the benchmark: on 400 a CI run's reward model once judged a candidate
    # at 0.48 on the gate's prompts (below the bar 0.55) that answered them in 7.8 words
    # where its parent took 12; other runs on 400 judged 0.72.
    assert summary["promoted"] is True, summary
    assert summary["baseline_version"] == "policy-v1"
    assert summary["new_version"] == "policy-v2"
    assert summary["feedback_rows"] == 600
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high
    # Half of the held-out questions won would be no learning at all: the win rate's 95 % interval
    # lies above it. (A fixed 0.75 on 32 questions failed a CI run at 0.72, whose interval starts
    # near 0.55; the benchmark holds the 0.8 goal, on 600 comparisons.)
    assert low > 0.5, summary
    assert summary["gate"]["win_rate"] >= 0.55 and summary["gate"]["kl_to_parent"] > 0
    # Where the time went: every stage and each job of the cycle, within the run's own seconds.
    stages = summary["seconds_by_stage"]
    assert set(stages) == {
        "baseline_answers",
        "collect",
        "cycle",
        "new_answers",
        "job_rm",
        "job_dpo",
        "job_gate",
    }, stages
    assert all(s > 0 for s in stages.values()), stages
    assert stages["job_rm"] + stages["job_dpo"] + stages["job_gate"] <= stages["cycle"]
    assert (
        sum(stages[k] for k in ("baseline_answers", "collect", "cycle", "new_answers"))
        <= (summary["seconds"])
    )
    # The version directory is what the registry says, with its provenance.
    manifest = json.loads((data_dir / "models" / "policy-v2" / "manifest.json").read_text())
    assert (manifest["job"], manifest["parent"]) == ("dpo", "policy-v1")
    assert manifest["data"]["preference"]["train"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("invert", [False, True], ids=["better", "inverted"])
def test_simulated_people_promote_a_better_canary_and_reject_a_worse_one(
    tmp_path: Path, demo: Path, invert: bool
) -> None:
    """`--human-gate`: the candidate that passes the reward model's gate answers a share of live
    traffic; simulated raters judge it against the served version from the task queue. Trained
    on the raters' preference, people promote it; trained on its opposite (`--invert`: the
    reward model, trained on the same votes, lets it through), people reject it."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "tuneloop.cli", "simulate",
            "--data-dir", str(tmp_path / "sim"), "--model", str(demo),
            "--preference", "concise", "--comparisons", "600", "--heldout", "16",
            "--samples", "2", "--human-gate", "--human-judgments", "60",
            # Trained on the opposite, one plain account pushes it through every route a user
            # has: people, not the attacker, decide. (The opposite of `concise` talks about 3
            # times longer, which the gate's length limit alone would refuse: lifted here, so
            # that people have to.)
            *(
                ["--invert", "--gate-attacker", "200", "--gate-max-length-ratio", "100"]
                if invert
                else []
            ),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["gate"]["promote"] is True, summary  # the reward model's gate let it through
    human = summary["human_gate"]
    assert human["judgments"] >= 60 and human["baseline"] == "policy-v1"
    if invert:
        assert human["status"] == "rejected" and human["win_rate"] < 0.5, human
        attack = human["attack"]
        assert attack["sent"] == 200 and attack["tasks_next_status"] == 403, attack
        assert sum(attack["stored"].values()) == 200  # stored as the user's own feedback
        assert "sim-attacker" not in human["by_rater"]
        assert summary["promoted"] is False and summary["win_rate"] < 0.5
    else:
        assert human["status"] == "promoted" and human["lower"] > 0.5, human
        assert summary["promoted"] is True and summary["win_rate_ci"][0] > 0.5
    assert summary["seconds_by_stage"]["human_gate"] > 0


def _simulate(args: list[str], timeout: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_traffic_mode_sends_each_signal_through_the_server(tmp_path: Path, demo: Path) -> None:
    """`--traffic`: users' thumbs, ratings, edits and regenerations reach the store and the
    snapshot's preference dataset; raters' judgments go through the queue, and the operator
    quarantines bad raters before the cycle. Tiny numbers; every user reacts to every answer."""
    import duckdb
    import pyarrow.parquet as pq

    data_dir = tmp_path / "sim"
    summary = _simulate(
        [
            "--data-dir", str(data_dir), "--model", str(demo), "--preference", "concise",
            "--traffic", "30", "--user-feedback", "1", "--judgments", "40", "--raters", "4",
            "--bad-raters", "0.5", "--heldout", "2", "--samples", "1",
            "--kind", "dpo", "--set", "max_steps=1",
        ],
        timeout=600,
    )  # fmt: skip
    rows, reactions = summary["rows_by_kind"], summary["reactions"]
    assert set(rows) == {"thumbs", "rating", "edit", "comparison", "ranking"}, rows
    assert rows["thumbs"] > 0 and rows["rating"] > 0, rows
    assert rows["edit"] == reactions.get("edit", 0)  # `concise` offers edits: cut answers
    assert reactions["regenerate"] > 0, reactions
    # Every judgment is stored (the last one or two of the budget may find no task left).
    assert rows["comparison"] == summary["judgments"] and 38 <= summary["judgments"] <= 40, summary
    assert summary["raters"] == 4 and summary["bad_raters"] == 2
    for key in ("bad_raters_caught", "honest_raters_caught"):
        assert 0 <= summary[key] <= 1, summary
    assert {"win_rate", "promoted", "new_version"} <= set(summary)
    assert {"baseline_answers", "traffic", "judgments", "cycle"} <= set(summary["seconds_by_stage"])
    with duckdb.connect(str(data_dir / "feedback.duckdb"), read_only=True) as con:
        # Every judgment names the task the queue handed out; some tasks are gold.
        assert (
            con.execute("SELECT count(*) FROM comparisons WHERE task_id IS NULL").fetchone()[0] == 0
        )
        overlaps = {o for (o,) in con.execute("SELECT overlap FROM tasks").fetchall()}
        assert overlaps <= {2, 3} and overlaps, overlaps
        gold = con.execute("SELECT count(gold_response_id) FROM tasks").fetchone()[0]
        assert gold >= 1
    sources: list[str] = []
    for path in data_dir.glob("snapshots/*/datasets/preference.*.parquet"):
        sources += pq.read_table(path, columns=["source"]).column("source").to_pylist()
    assert "regenerate" in sources, sorted(set(sources))


@pytest.mark.slow
def test_traffic_mode_learns_from_sparse_reactions_and_a_few_judgments(
    tmp_path: Path, demo: Path
) -> None:
    """The issue's run on the toy: 1,000 conversations, 15 % of answers reacted to, 150 rater
    judgments, the job the data calls for (`bon`). Seeds 0-2 won 0.92-0.98 in the benchmark (48
    held-out questions); this one, 32 held-out questions, won 0.73-0.80 before `bon` trained
    with RPO, 0.91 since (bench/RESULTS.md). The bar here is the goal's, 0.8."""
    summary = _simulate(
        [
            "--data-dir", str(tmp_path / "sim"), "--model", str(demo), "--preference", "concise",
            "--traffic", "1000", "--judgments", "150", "--raters", "6", "--heldout", "32",
        ],
        timeout=1800,
    )  # fmt: skip
    assert summary["traffic"] == 1000 and 140 <= summary["judgments"] <= 150, summary
    assert sum(summary["reactions"].values()) > 100, summary["reactions"]
    assert summary["rows_by_kind"]["thumbs"] > 0 and summary["rows_by_kind"]["comparison"] > 0
    assert summary["bad_raters"] == 0 and summary["bad_raters_caught"] is None
    assert summary["new_version"] == "policy-v2"
    assert summary["promoted"] is True and summary["win_rate"] >= 0.8, summary
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high


@pytest.mark.slow  # three reward models on the toy: about a minute and a half
def test_active_selection_asks_what_a_reward_model_of_the_feedback_so_far_doubts(
    tmp_path: Path, demo: Path
) -> None:
    """`--task-selection active`: before each batch of judgments a reward model is trained on
    the feedback so far and scores the open tasks; raters get the most informative first, from
    a pool of more tasks than the judgments cover."""
    import duckdb

    data_dir = tmp_path / "sim"
    summary = _simulate(
        [
            "--data-dir", str(data_dir), "--model", str(demo), "--preference", "concise",
            "--traffic", "30", "--user-feedback", "1", "--judgments", "12", "--raters", "4",
            "--heldout", "2", "--samples", "1", "--task-selection", "active",
            "--kind", "dpo", "--set", "max_steps=1",
        ],
        timeout=1200,  # about 90 s alone; a loaded machine took over 600
    )  # fmt: skip
    assert 10 <= summary["judgments"] <= 12, summary  # the budget, less what found no task
    with duckdb.connect(str(data_dir / "feedback.duckdb"), read_only=True) as con:
        rewards = con.execute("SELECT count(*) FROM model_versions WHERE kind = 'reward'")
        assert rewards.fetchone()[0] >= 3  # one per batch, and the cycle's own
        scorers = con.execute("SELECT count(DISTINCT reward_version) FROM task_scores")
        assert scorers.fetchone()[0] >= 1
        made, judged = con.execute(
            "SELECT count(*), count(*) FILTER (item IN (SELECT item FROM comparisons)) FROM tasks"
        ).fetchone()
        assert 0 < judged < made  # the queue's order chose which tasks were judged
