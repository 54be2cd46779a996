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
            # has: people, not the attacker, decide.
            *(["--invert", "--gate-attacker", "200"] if invert else []),
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
