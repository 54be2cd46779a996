"""The policy job a cycle runs when left to the data (`--train-kind auto`), and why."""

from __future__ import annotations

import pytest

from tuneloop.cli import build_parser
from tuneloop.core.settings import CycleSettings, ScheduleSettings, SettingsError
from tuneloop.loop.job_choice import NoJobError, choose_policy_job


@pytest.mark.parametrize(
    ("rows", "kind", "why"),
    [
        ({"preference": 600, "kto": 40, "sft": 10}, "dpo", "the pairs suffice"),
        ({"preference": 400, "kto": 800, "sft": 0}, "dpo", "the pairs suffice"),  # 2 to 1 at most
        ({"preference": 400, "kto": 801, "sft": 0}, "bon", "thumbs dominate"),
        ({"preference": 399, "kto": 10, "sft": 0}, "bon", "few pairs"),
        ({"preference": 3, "kto": 200, "sft": 30}, "bon", "thumbs dominate"),
        ({"preference": 0, "kto": 16, "sft": 0}, "bon", "thumbs dominate"),
        ({"preference": 2, "kto": 5, "sft": 20}, "sft", "edits and well-rated answers"),
        ({"preference": 2, "kto": 5, "sft": 1}, "bon", "few rows of any kind"),
        ({"preference": 0, "kto": 0, "sft": 1}, "sft", "few rows of any kind"),
    ],
)
def test_the_data_chooses_the_job(rows: dict[str, int], kind: str, why: str) -> None:
    chosen, reason = choose_policy_job(rows)
    assert chosen == kind and reason.startswith(f"{kind}: {why}")
    assert f"{rows['preference']} preference pairs, {rows['kto']} KTO rows" in reason


def test_no_rows_no_job() -> None:
    with pytest.raises(NoJobError, match="no rows any policy job learns from"):
        choose_policy_job({"preference": 0, "kto": 0, "sft": 0})


def test_auto_is_the_schedules_default_and_any_cycles_choice() -> None:
    assert ScheduleSettings().kind == "auto"
    assert CycleSettings(kind="auto").kind == "auto"
    with pytest.raises(SettingsError, match="unknown job"):
        CycleSettings(kind="whatever")
    parser = build_parser()
    assert parser.parse_args(["up", "--train-kind", "auto"]).train_kind == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--train-kind", "rm"])  # the schedule trains policies
