"""Each setting and job kind is defined once, in `tuneloop.core.settings`; the CLI's options, the
admin API's request and the job spec are made from that definition. A setting added there (a
dummy one here) shows up in all of them without another change."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneloop.cli import build_parser
from tuneloop.cli_settings import add_options, option_values, settings_from_args
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import (
    JOB_DESCRIPTIONS,
    JOBS,
    GateSettings,
    ScheduleSettings,
    SettingsError,
    setting,
)
from tuneloop.serve.admin import TrainIn, _optional_options


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
    request = _optional_options(DummySettings)
    assert set(request) == {"dummy_patience", "dummy_verbose", "dummy_ratio"}
    assert (
        request["dummy_patience"][1].description
        == "cycles to wait, 100% sure (default: the server's)"
    )


def test_the_gate_and_schedule_options_come_from_their_settings() -> None:
    parser = build_parser()
    up = parser.parse_args(["up", "--gate-prompts", "9", "--train-kind", "kto", "--schedule"])
    assert settings_from_args(GateSettings, up) == GateSettings(max_prompts=9)
    assert settings_from_args(ScheduleSettings, up) == ScheduleSettings(enabled=True, kind="kto")
    train = parser.parse_args(["train", "dpo", "--min-win-rate", "0.6", "--gate-max-kl", "0.2"])
    assert settings_from_args(GateSettings, train) == GateSettings(min_win_rate=0.6, max_kl=0.2)
    schema = TrainIn.model_json_schema()["properties"]
    assert {"min_win_rate", "gate_prompts", "gate_max_tokens", "gate_max_kl"} <= set(schema)
    with pytest.raises(SettingsError, match="at least 1 prompt"):
        settings_from_args(GateSettings, parser.parse_args(["up", "--gate-prompts", "0"]))


def test_every_job_kind_reaches_the_cli_the_api_and_the_job_spec(tmp_path: Path) -> None:
    parser = build_parser()
    for kind in JOBS:
        assert parser.parse_args(["train", kind]).kind == kind
        spec = JobSpec(kind, tmp_path, tmp_path, tmp_path / "v", "v")
        assert JobSpec.read(spec.write(tmp_path / "spec.json")).kind == kind
    assert TrainIn.model_json_schema()["properties"]["kind"]["enum"] == list(JOBS)
    assert set(JOB_DESCRIPTIONS) == set(JOBS)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "ppo"])
