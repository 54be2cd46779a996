"""The loop on SmolLM2-135M-Instruct: real human preference pairs imported into a fresh data dir,
a reward model, a DPO cycle with the gate, and every policy job kind with LoRA on the real
architecture's modules. Sizes are small (CI time); the long runs are in bench/."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from job_datasets import write_datasets

from tuneloop.core.artifacts import is_adapter, load_causal_lm, read_manifest
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JobSettings
from tuneloop.train.job_config import LORA_TARGETS
from tuneloop.train.run import train_version

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

HH_PAIRS = Path(__file__).parents[3] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
# Small steps: a CI run trains on 2 cores.
SMALL = ("--set", "max_steps=2", "--set", "per_device_train_batch_size=2")


def tuneloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", *args], capture_output=True, text=True, timeout=1800
    )


def test_reward_model_and_a_gated_dpo_cycle_from_real_pairs(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    if not HH_PAIRS.exists():
        pytest.skip(reason=f"no shared data at {HH_PAIRS}")
    dd = ("--data-dir", str(tmp_path / "data"))
    imported = tuneloop(
        "data", "import", str(HH_PAIRS), "--limit", "48", "--model", str(smollm2_dir), *dd
    )
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["pairs"] == 48

    cycle = tuneloop(
        "train", "dpo", *SMALL, "--set", "max_length=384",
        "--rm-set", "max_steps=2", "--rm-set", "per_device_train_batch_size=2",
        "--rm-set", "max_length=384",
        "--gate-prompts", "6", "--gate-max-tokens", "16", *dd,
    )  # fmt: skip
    assert cycle.returncode == 0, cycle.stderr
    result = json.loads(cycle.stdout.splitlines()[-1])
    assert result["reward_version"] == "reward-v1"
    assert result["candidate_version"] == "policy-v2"
    gate = result["gate"]
    assert gate["prompts"] == 6 and 0.0 <= gate["win_rate"] <= 1.0 and gate["kl_to_parent"] >= 0.0
    assert result["promoted"] == gate["promote"]

    versions = {v["id"]: v for v in json.loads(tuneloop("versions", "--json", *dd).stdout)}
    policy = Path(versions["policy-v2"]["artifact_path"])
    manifest = read_manifest(policy)
    assert is_adapter(policy) and manifest["base"] == str(smollm2_dir)
    assert set(manifest["lora"]["target_modules"]) == set(LORA_TARGETS)
    assert manifest["data"]["preference"]["train"] > 0
    reward = read_manifest(versions["reward-v1"]["artifact_path"])
    assert reward["kind"] == "reward" and reward["base"] == str(smollm2_dir)

    unseen = tmp_path / "unseen.jsonl"  # pairs 49-72 of the file, which the import left out
    with gzip.open(HH_PAIRS, "rt") as f:
        unseen.write_text("".join(line for i, line in enumerate(f) if 48 <= i < 72))
    evaluated = tuneloop("eval", "rm", "--data", str(unseen), "--json", *dd)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert scores["version"] == "reward-v1" and scores["pairs"] == 24
    assert 0.0 <= scores["accuracy"] <= 1.0
    # The same reward model by its directory, from a data dir that has none.
    fresh = ("--data-dir", str(tmp_path / "fresh"))
    reward_dir = versions["reward-v1"]["artifact_path"]
    direct = tuneloop("eval", "rm", "--data", str(unseen), "--model", reward_dir, "--json", *fresh)
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["accuracy"] == scores["accuracy"]


@pytest.mark.parametrize("kind", ["kto", "sft", "bon", "rl"])
def test_every_policy_job_trains_a_lora_on_smollm2(
    kind: str, tmp_path: Path, smollm2_dir: Path
) -> None:
    import torch

    datasets = write_datasets(tmp_path / "datasets", train_pairs=16, heldout_pairs=4)
    overrides: dict[str, object] = {"max_steps": 2, "per_device_train_batch_size": 2}
    extra = {}
    if kind in ("bon", "rl"):  # the jobs that learn from a reward model
        rm_settings = JobSettings(overrides=dict(overrides))
        reward = train_version(
            JobSpec("rm", datasets, smollm2_dir, tmp_path / "rm", "rm", settings=rm_settings)
        )
        extra = {"reward_model": reward}
        overrides |= {"num_generations": 2, "max_completion_length": 8}
        if kind == "bon":
            overrides["max_prompts"] = 4
    settings = JobSettings(overrides=overrides)
    spec = JobSpec(kind, datasets, smollm2_dir, tmp_path / kind, kind, settings=settings, **extra)
    version = train_version(spec)
    manifest = read_manifest(version)
    assert is_adapter(version) and manifest["job"] == kind
    assert set(manifest["lora"]["target_modules"]) == set(LORA_TARGETS)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 30, 2]])
    with torch.no_grad():
        new, old = load_causal_lm(version)(ids).logits, load_causal_lm(smollm2_dir)(ids).logits
    assert not torch.allclose(new, old)
