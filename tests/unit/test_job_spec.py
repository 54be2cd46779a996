"""A job process is told what to do by one JSON spec file: it round-trips, and a file that does
not fit is refused with the reason, before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.core.job_spec import GateSpec, JobSpec
from tuneloop.core.settings import GateSettings, JobSettings, SettingsError, parse_overrides
from tuneloop.train import run


def a_job(tmp_path: Path, **changes: object) -> JobSpec:
    fields: dict = {
        "kind": "dpo",
        "datasets": tmp_path / "datasets",
        "base": tmp_path / "base",
        "out": tmp_path / "models" / "policy-v2",
        "version_id": "policy-v2",
        "parent": tmp_path / "models" / "policy-v1",
        "parent_id": "policy-v1",
        "snapshot_id": "snap-1",
        "status": tmp_path / "status.json",
        "settings": JobSettings(
            config_file=tmp_path / "dpo.yaml",
            overrides=parse_overrides(["beta=0.2", "lora.target_modules=[q_proj, v_proj]"]),
            full=False,
            seed=3,
        ),
    }
    return JobSpec(**(fields | changes))


def test_a_job_spec_round_trips_through_its_file(tmp_path: Path) -> None:
    spec = a_job(tmp_path)
    path = spec.write(tmp_path / "run" / "spec.json")
    assert JobSpec.read(path) == spec
    written = json.loads(path.read_text())
    assert written["settings"]["overrides"] == {
        "beta": 0.2,
        "lora.target_modules": ["q_proj", "v_proj"],
    }
    assert written["reward_model"] is None and written["out"] == str(spec.out)


def test_a_gate_spec_round_trips_with_its_settings(tmp_path: Path) -> None:
    settings = GateSettings(min_win_rate=0.6, max_kl=0.2, device="cpu", mt_bench=tmp_path / "q")
    spec = GateSpec(
        *(tmp_path / n for n in ("c", "i", "r", "gate.json")),
        datasets=tmp_path / "d",
        settings=settings,
    )
    assert GateSpec.read(spec.write(tmp_path / "spec.json")) == spec


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(kind="ppo"), "unknown job 'ppo'"),
        (lambda d: d.pop("out"), "out"),
        (lambda d: d.update(learning_rate=1), "unknown fields \\['learning_rate'\\]"),
        (lambda d: d["settings"].update(lr=1), "unknown fields \\['lr'\\]"),
    ],
)
def test_a_spec_that_does_not_fit_is_refused(tmp_path: Path, edit, message: str) -> None:
    path = a_job(tmp_path).write(tmp_path / "spec.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(SettingsError, match=message):
        JobSpec.read(path)


def test_a_gate_spec_names_exactly_one_prompt_source(tmp_path: Path) -> None:
    both = GateSpec(*(tmp_path / n for n in "cirop"), prompts=tmp_path / "p.jsonl")
    neither = GateSpec(*(tmp_path / n for n in "ciro"))
    for spec in (both, neither):
        with pytest.raises(SettingsError, match="prompts or datasets, one of them"):
            GateSpec.read(spec.write(tmp_path / "spec.json"))


def test_the_job_process_refuses_a_bad_spec_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"kind": "dpo"}')
    assert run.main([str(path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {path} is not a JobSpec:") and "\n" not in error
    assert run.main(["--set", "x=1"]) == 2
