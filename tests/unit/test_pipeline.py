"""`Pipeline.run`, fast: the real pipeline, job runner, store and registry, with a stub job
interpreter in place of `python -m tuneloop.train.run|gate` (no torch). The stub reads the spec
file the loop wrote, reports through the status file as a job does, and writes a version dir or a
gate result, or fails, or hangs, as the test's plan says."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tuneloop.core.config import DataDir
from tuneloop.core.records import Message, ModelVersion, Response, SamplingParams, Thumbs
from tuneloop.core.settings import JobSettings
from tuneloop.feedback import registry
from tuneloop.feedback.accounts import add_account
from tuneloop.feedback.runs import list_runs
from tuneloop.feedback.store import FeedbackStore
from tuneloop.loop.job_runner import JobFailed
from tuneloop.loop.pipeline import NothingToTrainError, Pipeline
from tuneloop.loop.promotion import Promotion

STUB = f"""#!{sys.executable}
import json, os, sys, time
from pathlib import Path

module, spec = sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
plan = json.loads(Path(os.environ["STUB_PLAN"]).read_text())
kind = "gate" if module.endswith(".gate") else spec["kind"]
todo = plan.get(kind, "ok")
status = Path(spec["status"])

def report(state, stage, progress, error=None):
    tmp = status.with_name("status.tmp")
    tmp.write_text(json.dumps(dict(state=state, stage=stage, progress=progress, error=error)))
    os.replace(tmp, status)

report("running", "training", 0.5)
time.sleep(plan.get("seconds", 0))
if todo == "fail":
    report("failed", "training", 0.5, "CUDA out of memory (stub)")
    sys.exit(1)
if todo == "crash":
    sys.exit(3)
if kind == "gate":
    promote = plan.get("promote", True)
    result = dict(promote=promote, reason="stub says " + str(promote), win_rate=0.7)
    Path(spec["out"]).write_text(json.dumps(result))
else:
    out = Path(spec["out"])
    out.mkdir(parents=True)
    manifest = dict(job=kind, base=spec["base"], adapter=False, config=dict(seed=0),
                    metrics=dict(steps=3), data=dict(preference=dict(train=0)),
                    settings=spec["settings"])
    (out / "manifest.json").write_text(json.dumps(manifest))
report("done", "done", 1.0)
"""


class Swaps:
    """The server's side of promotion: records each hot-swap, or fails it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.loaded = fail, []

    def __call__(self, version: ModelVersion) -> None:
        if self.fail:
            raise RuntimeError(f"loading {version.id} failed")
        self.loaded.append(version.id)


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(tmp_path / "data" / "feedback.duckdb") as s:
        registry.ensure_served_policy(s, "base", lambda _: str(tmp_path / "base"), reason="test")
        yield s


def pipeline(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch, **plan: Any
) -> tuple[Pipeline, Swaps]:
    stub = tmp_path / "stub-python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    stop = plan.pop("stop", None)
    swaps = Swaps(fail=plan.pop("swap", None) == "fail")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setenv("STUB_PLAN", str(tmp_path / "plan.json"))
    promotion = Promotion(store, swaps)
    return Pipeline(
        DataDir(tmp_path / "data"), store, promotion=promotion, python=str(stub), stop=stop
    ), swaps


def runs_by_kind(store: FeedbackStore) -> dict[str, Any]:
    return {run.kind: run for run in list_runs(store, 10)}


def test_a_cycle_trains_gates_promotes_and_swaps(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, swaps = pipeline(tmp_path, store, monkeypatch)
    result = loop.run("dpo", JobSettings(overrides={"beta": 0.2}, seed=4))
    assert (result.reward.id, result.candidate.id) == ("reward-v1", "policy-v2")
    assert result.promoted and result.reason == "stub says True"
    assert swaps.loaded == ["policy-v2"]
    assert registry.promoted_version(store, "policy").id == "policy-v2"
    # Each job was told its settings through the spec file; every run ended done, stage written.
    manifest = json.loads((tmp_path / "data/models/policy-v2/manifest.json").read_text())
    assert manifest["settings"] == {
        "config_file": None,
        "overrides": {"beta": 0.2},
        "full": False,
        "seed": 4,
        "launch": {"launcher": "local", "accelerate_config": None, "num_processes": None},
    }
    # The manifest is the version's record: the gate's result and the feedback are in it.
    assert manifest["metrics"]["gate"]["reason"] == "stub says True"
    assert manifest["metrics"]["feedback_rows"]["comparison"] == 0
    assert registry.get_version(store, "policy-v2").metrics["gate"] == manifest["metrics"]["gate"]
    runs = runs_by_kind(store)
    assert set(runs) == {"rm", "dpo", "gate"}
    assert {(r.status, r.stage, r.progress) for r in runs.values()} == {("done", "done", 1.0)}


def test_a_rejected_candidate_is_not_served(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, swaps = pipeline(tmp_path, store, monkeypatch, promote=False)
    result = loop.run("kto")
    assert not result.promoted and swaps.loaded == []
    assert registry.get_version(store, "policy-v2").status == "rejected"
    assert registry.promoted_version(store, "policy").id == "policy-v1"


@pytest.mark.parametrize(
    ("todo", "error"),
    [
        ("fail", "CUDA out of memory (stub)"),
        ("crash", "the job process exited with code 3"),
    ],
)
def test_a_failed_job_leaves_what_is_served(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch, todo: str, error: str
) -> None:
    loop, swaps = pipeline(tmp_path, store, monkeypatch, dpo=todo)
    with pytest.raises(JobFailed, match=re.escape(error)):
        loop.run("dpo")
    failed = runs_by_kind(store)["dpo"]
    assert (failed.status, failed.stage) == ("failed", "failed") and error in failed.error
    assert registry.get_version(store, "policy-v2") is None
    assert not (tmp_path / "data/models/policy-v2").exists() and swaps.loaded == []
    assert registry.promoted_version(store, "policy").id == "policy-v1"


def test_a_failed_swap_leaves_the_candidate_unpromoted(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, _ = pipeline(tmp_path, store, monkeypatch, swap="fail")
    with pytest.raises(RuntimeError, match="loading policy-v2 failed"):
        loop.run("dpo")
    assert registry.get_version(store, "policy-v2").status == "candidate"
    assert registry.promoted_version(store, "policy").id == "policy-v1"


def test_stop_ends_a_running_job_and_the_runner_shows_its_stage(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = threading.Event()
    loop, _ = pipeline(tmp_path, store, monkeypatch, rm="ok", seconds=30, stop=stop)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run("rm")
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while (runs := list_runs(store, 1)) == [] or runs[0].stage != "training":
        assert time.monotonic() < deadline, runs
        time.sleep(0.1)
    assert runs[0].progress == 0.5  # mirrored from the job's status file while it runs
    stop.set()
    thread.join(30)
    assert len(errors) == 1 and "stopped by the operator" in str(errors[0])
    stopped = list_runs(store, 1)[0]
    assert (stopped.status, stopped.error) == ("failed", "stopped by the operator")
    assert registry.promoted_version(store, "reward") is None
    assert not (tmp_path / "data/models/reward-v1").exists()


def test_auto_trains_the_job_the_data_calls_for_and_records_why(
    tmp_path: Path, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, _ = pipeline(tmp_path, store, monkeypatch)
    with pytest.raises(NothingToTrainError, match="no rows any policy job learns from"):
        loop.run("auto")
    # Sparse reactions: thumbs on answers to 20 prompts, no pair among them (a rater's: one
    # user's would be capped at 5 % of the rows, `TrustSettings.max_user_share`).
    add_account(store, "rae", "rater", actor="test")
    for i in range(20):
        conversation = store.new_conversation_id("rae")
        rid = store.new_response_id()
        prompt = (Message("user", f"question {i}"),)
        answer = Response(rid, conversation, prompt, f"answer {i}", "policy-v1", SamplingParams(),
                          2, 2, 1.0, rater_id="rae")  # fmt: skip
        store.submit_response(answer).result()
        store.record_feedback(Thumbs(rid, 1 if i % 2 else -1, "rae"))
    result = loop.run("auto")
    assert result.job_choice["kind"] == "bon"
    assert result.job_choice["reason"].startswith("bon: thumbs dominate; the reward model")
    assert "(0 preference pairs, 19 KTO rows" in result.job_choice["reason"]  # 1 held out
    assert runs_by_kind(store)["bon"].status == "done"
    candidate = registry.get_version(store, result.candidate.id)
    assert candidate.metrics["job_choice"] == result.job_choice
    assert result.to_dict()["job_choice"] == result.job_choice
