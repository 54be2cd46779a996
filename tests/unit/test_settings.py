"""Each setting and job kind is defined once, in `tuneloop.core.settings`; the CLI's options, the
admin API's request and the job spec are made from that definition. A setting added there (a
dummy one here) shows up in all of them without another change."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI

from tuneloop.cli import build_parser
from tuneloop.cli_settings import add_options, option_values, settings_from_args
from tuneloop.core.artifacts import read_manifest
from tuneloop.core.config import DataDir
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import (
    JOB_KINDS,
    CycleSettings,
    GateSettings,
    JobKind,
    ScheduleSettings,
    SettingsError,
    jobs,
    setting,
)
from tuneloop.feedback.accounts import token_index
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.admin import create_admin_router, request_fields, train_request
from tuneloop.serve.auth import Principals
from tuneloop.serve.ui_operator import job_choices
from tuneloop.train.job_common import JobOutput, StatusFile
from tuneloop.train.run import train_version


@dataclass(frozen=True)
class DummySettings:
    patience: int = setting(3, "cycles to wait, 100% sure", option="dummy_patience")
    verbose: bool = setting(False, "say more", option="dummy_verbose")
    ratio: float | None = setting(None, "a ratio, if any", option="dummy_ratio")
    hidden: str = "not an option"


def test_a_new_setting_appears_on_the_command_line_and_in_the_api() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, DummySettings)
    args = parser.parse_args(["--dummy-patience", "5", "--dummy-verbose"])
    assert settings_from_args(DummySettings, args) == DummySettings(5, True, None)
    assert option_values(DummySettings, args) == {
        "dummy_patience": 5,
        "dummy_verbose": True,
        "dummy_ratio": None,
    }
    assert "cycles to wait, 100% sure (default: 3)" in " ".join(parser.format_help().split())
    request = request_fields(DummySettings, optional=True)
    assert set(request) == {"dummy_patience", "dummy_verbose", "dummy_ratio"}
    assert (
        request["dummy_patience"][1].description
        == "cycles to wait, 100% sure (default: the server's)"
    )


def test_the_gate_and_schedule_options_come_from_their_settings() -> None:
    parser = build_parser()
    up = parser.parse_args(["up", "--gate-prompts", "9", "--train-kind", "kto", "--schedule"])
    assert settings_from_args(GateSettings, up) == GateSettings(max_prompts=9)
    assert GateSettings().max_kl == 1.0  # on unless set otherwise
    assert settings_from_args(ScheduleSettings, up) == ScheduleSettings(enabled=True, kind="kto")
    train = parser.parse_args(["train", "dpo", "--min-win-rate", "0.6", "--gate-max-kl", "0.2"])
    assert settings_from_args(GateSettings, train) == GateSettings(min_win_rate=0.6, max_kl=0.2)
    schema = train_request().model_json_schema()["properties"]
    assert {"min_win_rate", "gate_prompts", "gate_max_tokens", "gate_max_kl"} <= set(schema)
    with pytest.raises(SettingsError, match="at least 1 prompt"):
        settings_from_args(GateSettings, parser.parse_args(["up", "--gate-prompts", "0"]))


def train_dummy(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    """The job function of the dummy kind below: writes one file, trains nothing."""
    (work / "dummy.txt").write_text(str(spec.settings.overrides))
    return JobOutput("policy", adapter=False, base=spec.base, config={}, metrics={}, data={})


def test_a_new_job_kind_appears_in_the_cli_the_api_the_operator_tab_and_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dummy = JobKind("dummy", "nothing at all", f"{__name__}:train_dummy")
    monkeypatch.setitem(JOB_KINDS, "dummy", dummy)

    parser = build_parser()
    args = parser.parse_args(["train", "dummy", "--set", "beta=0.2", "--no-gate"])
    cycle = settings_from_args(CycleSettings, args)
    assert (cycle.kind, cycle.gate) == ("dummy", False)
    assert cycle.job_settings().overrides == {"beta": 0.2}
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "dummy (nothing at all)" in " ".join(capsys.readouterr().out.split())
    assert ("dummy: nothing at all", "dummy") in job_choices()
    up = parser.parse_args(["up", "--train-kind", "dummy"])
    assert settings_from_args(ScheduleSettings, up).kind == "dummy"

    schema = train_request().model_json_schema()["properties"]
    assert schema["kind"]["enum"] == [*jobs(), "auto"] and "dummy" in schema["kind"]["enum"]
    assert {"overrides", "keep_reward", "gate", "min_win_rate", "gate_prompts"} <= set(schema)
    # The route takes it as its JSON body (the OpenAPI schema the server publishes).
    app = FastAPI()
    with FeedbackStore(tmp_path / "f.duckdb") as store:
        principals = Principals(lambda: token_index(store))
    router = create_admin_router(None, None, DataDir(tmp_path), principals)  # type: ignore[arg-type]
    app.include_router(router)
    route = app.openapi()["paths"]["/v1/admin/train"]["post"]
    assert [p["in"] for p in route["parameters"]] == ["header"]  # the token only
    body = route["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    published = app.openapi()["components"]["schemas"][body]["properties"]
    assert "dummy" in published["kind"]["enum"]

    settings = cycle.job_settings()
    spec = JobSpec("dummy", tmp_path, tmp_path, tmp_path / "v1", "v1", settings=settings)
    spec = JobSpec.read(spec.write(tmp_path / "spec.json"))
    out = train_version(spec)
    assert (out / "dummy.txt").read_text() == "{'beta': 0.2}"
    assert read_manifest(out)["job"] == "dummy"

    monkeypatch.delitem(JOB_KINDS, "dummy")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "dummy"])
    with pytest.raises(SettingsError, match="unknown job 'dummy'"):
        JobSpec.read(tmp_path / "spec.json")


def test_the_operator_tab_offers_every_job_kind() -> None:
    assert [k for _, k in job_choices()] == [*jobs(), "auto"]


def test_bad_cycle_requests_are_refused_with_the_reason() -> None:
    with pytest.raises(SettingsError, match="unknown job 'ppo'"):
        CycleSettings(kind="ppo")
    with pytest.raises(SettingsError, match="key=value"):
        CycleSettings(overrides=("beta",)).job_settings()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--kind", "sft"])
