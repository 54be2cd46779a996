"""A real DPO job under `accelerate launch` with 2 CPU processes (DDP over gloo, the shipped
`examples/accelerate/cpu_ddp.yaml`), against the same job in one process, both started with the
command a cycle runs (`job_runner.job_command`).

Both train on the same global batch of 8 pairs per step (4 per process against 8 in one), in
the same seeded order: accelerate shards each global batch of the one shuffled order between
the processes, and DDP averages the two halves' gradients into the full batch's mean. So the
loss curves agree up to float32 rounding (the all-reduce's summation order, matmuls over half
batches padded to their own length): seen at most 3.3e-7 apart. The
tolerance, 1e-4, leaves 300x room for that and is still 70x below the smallest change of the
loss from one step to the next once it moves (7.4e-3; the first step is warm-up at learning
rate 0), so a job whose processes saw other rows (every process the whole batch, a doubled
step count, an unseeded order) fails it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from job_datasets import write_datasets

from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JobSettings, LaunchSettings
from tuneloop.loop.job_runner import job_command, read_status

# Two real jobs and three processes: 18 s on a quiet 2-core machine, 65 s under outside load.
pytestmark = pytest.mark.slow

CPU_DDP = Path(__file__).resolve().parents[2] / "examples/accelerate/cpu_ddp.yaml"
TOLERANCE = 1e-4


def run_dpo(tmp: Path, model: Path, name: str, launch: LaunchSettings, batch: int) -> Path:
    """One DPO job of one epoch over 64 pairs (8 steps of 8), a loss logged every step."""
    out = tmp / name
    spec = JobSpec(
        kind="dpo",
        datasets=write_datasets(tmp / "datasets"),
        base=model,
        out=out,
        version_id=name,
        status=tmp / f"{name}.status.json",
        settings=JobSettings(
            overrides={"num_train_epochs": 1, "per_device_train_batch_size": batch}
            | {"logging_steps": 1},
            launch=launch,
        ),
    )
    cmd = job_command("run", spec.write(tmp / f"{name}.spec.json"), launch=launch)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def manifest(version: Path) -> dict[str, Any]:
    return json.loads((version / "manifest.json").read_text())


def test_two_cpu_processes_train_the_same_loss_curve_as_one(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    one = manifest(run_dpo(tmp_path, tiny_model_dir, "one", LaunchSettings(), batch=8))
    two_dir = run_dpo(
        tmp_path, tiny_model_dir, "two", LaunchSettings("accelerate", CPU_DDP), batch=4
    )
    two = manifest(two_dir)

    assert (one["launcher"], one["world_size"]) == ("local", 1)
    assert (two["launcher"], two["world_size"]) == ("accelerate", 2)
    assert two["settings"]["launch"]["accelerate_config"] == str(CPU_DDP)

    curve_one, curve_two = one["metrics"]["train_loss_curve"], two["metrics"]["train_loss_curve"]
    assert [step for step, _ in curve_one] == [step for step, _ in curve_two] == list(range(1, 9))
    for (step, a), (_, b) in zip(curve_one, curve_two, strict=True):
        assert b == pytest.approx(a, abs=TOLERANCE), f"step {step}: {a} vs {b}"
    assert curve_one[-1][1] < curve_one[0][1] - 0.1  # it learned: the comparison means something
    # The same text went through both (TRL counts tokens over all processes).
    assert one["metrics"]["train_tokens"] == two["metrics"]["train_tokens"]
    assert two["metrics"]["heldout_loss"] == pytest.approx(
        one["metrics"]["heldout_loss"], abs=TOLERANCE
    )

    # Rank 0 alone wrote the status file and the version; rank 1's scratch dir is gone.
    status = read_status(tmp_path / "two.status.json")
    assert (status["state"], status["step"], status["total_steps"]) == ("done", 8, 8)
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert not list(tmp_path.glob("two.*tmp"))
