"""How a job process starts: the launcher settings, on the command line and in the job spec, the
command line a job runs under `accelerate launch`, and each process's share of the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneloop.cli import build_parser
from tuneloop.cli_settings import settings_from_args
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import (
    CycleSettings,
    JobSettings,
    LaunchSettings,
    ScheduleSettings,
    SettingsError,
)
from tuneloop.loop.job_runner import job_command
from tuneloop.train.job_config import resolve_max_steps
from tuneloop.train.processes import JobProcesses, job_processes, threads_per_process

CONFIG = Path("/cfg/cpu_ddp.yaml")


def test_a_local_job_is_one_python_process() -> None:
    spec = Path("/runs/r1/spec.json")
    expected = [sys.executable, "-m", "tuneloop.train.run", str(spec)]
    assert job_command("run", spec) == expected
    assert job_command("run", spec, launch=LaunchSettings()) == expected
    assert job_command("gate", spec, "/venv/bin/python")[:3] == [
        "/venv/bin/python",
        "-m",
        "tuneloop.train.gate",
    ]


def test_an_accelerate_job_runs_the_same_module_under_accelerate_launch() -> None:
    spec = Path("/runs/r1/spec.json")
    launch = LaunchSettings("accelerate", CONFIG, 2)
    assert job_command("run", spec, "/venv/bin/python", launch) == [
        "/venv/bin/python",
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--num_processes",
        "2",
        "-m",
        "tuneloop.train.run",
        str(spec),
    ]
    # Without a file or a count, accelerate's own config decides.
    assert job_command("run", spec, "py", LaunchSettings("accelerate")) == [
        "py",
        "-m",
        "accelerate.commands.launch",
        "-m",
        "tuneloop.train.run",
        str(spec),
    ]


def test_the_accelerate_launch_cli_takes_these_arguments() -> None:
    from accelerate.commands.launch import launch_command_parser

    argv = job_command("run", Path("spec.json"), launch=LaunchSettings("accelerate", CONFIG, 2))
    args = launch_command_parser().parse_args(argv[3:])
    assert (args.config_file, args.num_processes) == (str(CONFIG), 2)
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "tuneloop.train.run",
        ["spec.json"],
    )


@pytest.mark.parametrize(
    "given",
    [
        {"launcher": "torchrun"},
        {"accelerate_config": CONFIG},  # needs the accelerate launcher
        {"num_processes": 2},
        {"launcher": "accelerate", "num_processes": 0},
    ],
)
def test_launch_settings_that_do_not_fit_are_refused(given: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        LaunchSettings(**given)  # type: ignore[arg-type]
    with pytest.raises(SettingsError):
        CycleSettings(**given)  # type: ignore[arg-type]


def test_train_and_up_take_the_launcher_options() -> None:
    parser = build_parser()
    train = parser.parse_args(
        ["train", "dpo", "--launcher", "accelerate", "--accelerate-config", str(CONFIG)]
        + ["--num-processes", "2"]
    )
    cycle = settings_from_args(CycleSettings, train)
    launch = LaunchSettings("accelerate", CONFIG, 2)
    # Both of the cycle's training jobs (the reward model and the policy) start that way.
    assert cycle.job_settings().launch == cycle.reward_settings().launch == launch
    assert settings_from_args(CycleSettings, parser.parse_args(["train", "dpo"])).launch() == (
        LaunchSettings()
    )
    up = parser.parse_args(["up", "--launcher", "accelerate", "--num-processes", "4"])
    assert settings_from_args(ScheduleSettings, up).launch() == LaunchSettings(
        "accelerate", None, 4
    )


def test_the_job_spec_carries_the_launch_settings(tmp_path: Path) -> None:
    launch = LaunchSettings("accelerate", tmp_path / "cpu_ddp.yaml", 2)
    spec = JobSpec(
        kind="dpo",
        datasets=tmp_path / "data",
        base=tmp_path / "base",
        out=tmp_path / "out",
        version_id="policy-v2",
        settings=JobSettings(launch=launch),
    )
    path = spec.write(tmp_path / "spec.json")
    assert JobSpec.read(path).settings.launch == launch
    # A spec written before launchers existed reads as a local job.
    data = json.loads(path.read_text())
    del data["settings"]["launch"]
    path.write_text(json.dumps(data))
    assert JobSpec.read(path).settings.launch == LaunchSettings()


def test_each_process_knows_its_rank_and_its_share_of_the_cores() -> None:
    assert job_processes({}) == JobProcesses(0, 1, 1)
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    processes = job_processes(env)
    assert processes == JobProcesses(1, 4, 2) and not processes.main
    assert threads_per_process(2, job_processes({"WORLD_SIZE": "2"})) == 1
    assert threads_per_process(16, processes) == 8
    assert threads_per_process(2, JobProcesses(0, 4, 4)) == 1  # never below one


def test_the_step_count_counts_the_rows_every_process_takes() -> None:
    def config(world_size: int, batch: int) -> SimpleNamespace:
        return SimpleNamespace(
            max_steps=-1,
            num_train_epochs=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            world_size=world_size,
        )

    one, two = config(1, 8), config(2, 4)
    for c in (one, two):
        resolve_max_steps(c, 64, step_cap=200)
    assert one.max_steps == two.max_steps == 8
