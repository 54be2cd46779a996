"""Training jobs on the tiny model: real TRL + PEFT steps, version dirs, status files, failures."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from job_datasets import msg, pairs, write_datasets, write_split

from tuneloop.core.artifacts import is_adapter, load_causal_lm, read_manifest
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import JobSettings, SettingsError, parse_overrides
from tuneloop.train import job_config
from tuneloop.train.job_common import load_dataset_splits
from tuneloop.train.job_config import (
    JobError,
    build_config,
    count_parameters,
    cpu_has_amx,
    read_config_file,
)
from tuneloop.train.reward_data import PARTNERS
from tuneloop.train.run import train_version

MANIFEST_KEYS = {
    "id",
    "kind",
    "job",
    "launcher",
    "world_size",
    "base",
    "parent",
    "parent_path",
    "adapter",
    "snapshot_id",
    "config",
    "lora",
    "settings",
    "reward_model",
    "metrics",
    "code_version",
    "created_at",
    "data",
}
FAST = {"max_steps": 3, "per_device_train_batch_size": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def reward_version(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_model_dir: Path
) -> tuple[Path, Path]:
    """A reward model trained with the job's defaults but 2 epochs; returns (version dir, status
    file)."""
    tmp = tmp_path_factory.mktemp("rm")
    spec = JobSpec(
        kind="rm",
        datasets=data_dir,
        base=tiny_model_dir,
        out=tmp / "rm-1",
        version_id="rm-1",
        snapshot_id="snap-1",
        status=tmp / "status.json",
        settings=JobSettings(overrides={"num_train_epochs": 2}),
    )
    return train_version(spec), tmp / "status.json"


@pytest.fixture(scope="module")
def sft_version(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_model_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("sft") / "sft-1"
    spec = JobSpec(
        "sft", data_dir, tiny_model_dir, out, "sft-1", settings=JobSettings(overrides=FAST)
    )
    return train_version(spec)


def spec_for(
    tmp_path: Path,
    kind: str,
    data_dir: Path,
    base: Path,
    *,
    overrides: dict[str, Any] | None = None,
    full: bool = False,
    **kwargs: Any,
) -> JobSpec:
    return JobSpec(
        kind=kind,
        datasets=data_dir,
        base=base,
        out=tmp_path / "v",
        version_id="v",
        status=tmp_path / "status.json",
        settings=JobSettings(overrides=overrides or {}, full=full),
        **kwargs,
    )


def status_of(spec: JobSpec) -> dict[str, Any]:
    assert spec.status is not None
    return json.loads(spec.status.read_text())


def changes_outputs(version: Path, base: Path) -> bool:
    import torch

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        new, old = load_causal_lm(version)(ids).logits, load_causal_lm(base)(ids).logits
    return not torch.allclose(new, old)


# --- Reward model ---------------------------------------------------------------------------------


def test_reward_model_learns_an_easy_preference(reward_version, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tuneloop.train.scoring import RewardScorer

    version, status_file = reward_version
    manifest = read_manifest(version)
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["kind"] == "reward" and manifest["job"] == "rm"
    assert manifest["adapter"] is False and not is_adapter(version)
    assert manifest["base"] == str(tiny_model_dir.resolve())
    assert manifest["parent"] is None and manifest["snapshot_id"] == "snap-1"
    # The 64 pairs and the 128 thumbs paired across prompts, each drawing up to 2 partners.
    sources = manifest["data"]["sources"]
    assert set(sources) == {"comparison", "thumbs_unpaired"} and sources["comparison"] == 64
    assert 64 <= sources["thumbs_unpaired"] <= PARTNERS * 128
    train_rows = sum(sources.values())
    assert manifest["data"]["preference"] == {"train": train_rows, "too_long": 0, "heldout": 16}
    assert manifest["config"]["learning_rate"] > 0 and "output_dir" not in manifest["config"]
    metrics = manifest["metrics"]
    assert metrics["heldout_pairs"] == 16
    assert metrics["heldout_accuracy"] > 0.8 and metrics["heldout_margin"] > 0
    assert metrics["train_loss"] < 0.5

    # Merged full weights: plain transformers loads it, the gate's scorer scores it.
    model = AutoModelForSequenceClassification.from_pretrained(version)
    assert model.config.num_labels == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    prompt = msg("user", "Question 7: what about sets?")
    good, bad = RewardScorer(version).score([prompt, prompt], ["Certainly, sets.", "No idea."])
    assert good > bad

    status = json.loads(status_file.read_text())
    assert status["state"] == "done" and status["progress"] == 1.0 and status["error"] is None
    assert status["step"] == status["total_steps"] == metrics["steps"] > 0
    assert status["metrics"]["heldout_accuracy"] == metrics["heldout_accuracy"]
    assert {"loss", "updated_at", "job", "version_id"} <= set(status)


def test_reward_model_without_heldout_pairs_reports_null_accuracy(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = write_datasets(tmp_path / "data", train_pairs=8, heldout_pairs=0)
    version = train_version(spec_for(tmp_path, "rm", data, tiny_model_dir, overrides=FAST))
    metrics = read_manifest(version)["metrics"]
    assert metrics["heldout_pairs"] == 0 and metrics["heldout_accuracy"] is None


@pytest.mark.parametrize("job", ["rm", "dpo"])
def test_pairs_too_long_for_the_trainer_are_counted_apart(
    job: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """TRL leaves out, without a word, pairs over `max_length` (reward) or whose prompt fills it
    (DPO); the manifest says how many trained and how many were left out, and an epoch is a pass
    over the pairs kept: 8 at 4 a step is 2 steps (the 11 offered would make 3)."""
    rng = random.Random(0)
    long = pairs(3, 100, rng)
    for row in long:  # ~380 tokens of prompt; the others are ~45 tokens in all
        row["prompt"] = msg("user", "Tell me more about it. " * 40)
    data = tmp_path / "data"
    data.mkdir()
    write_split(data, "preference", "train", pairs(8, 0, rng) + long)
    write_split(data, "preference", "heldout", pairs(4, 1000, rng))
    write_split(data, "kto", "train", [])  # the reward model's thumbs: none
    overrides = {"per_device_train_batch_size": 4, "num_train_epochs": 1, "max_length": 128}
    version = train_version(spec_for(tmp_path, job, data, tiny_model_dir, overrides=overrides))
    manifest = read_manifest(version)
    assert manifest["data"]["preference"] == {"train": 8, "too_long": 3, "heldout": 4}
    assert manifest["config"]["max_steps"] == 2 and manifest["metrics"]["steps"] == 2


def test_a_dataset_left_empty_by_max_length_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    rng = random.Random(0)
    long = pairs(3, 0, rng)
    for row in long:
        row["prompt"] = msg("user", "Tell me more about it. " * 40)
    data = tmp_path / "data"
    data.mkdir()
    write_split(data, "preference", "train", long)
    write_split(data, "preference", "heldout", pairs(2, 1000, rng))
    write_split(data, "kto", "train", [])
    spec = spec_for(tmp_path, "rm", data, tiny_model_dir, overrides={"max_length": 128})
    with pytest.raises(JobError, match=r"all 3 train rows are over max_length=128"):
        train_version(spec)
    assert not spec.out.exists()


def test_packed_sft_counts_the_rows_it_joined(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    overrides = {**FAST, "packing": True, "max_length": 128}
    version = train_version(
        spec_for(tmp_path, "sft", data_dir, tiny_model_dir, overrides=overrides)
    )
    assert read_manifest(version)["data"] == {"sft": {"train": 64, "too_long": 0, "heldout": 16}}


# --- Policy jobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["dpo", "kto", "sft"])
def test_policy_job_writes_a_loadable_adapter(
    job: str, tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    spec = spec_for(tmp_path, job, data_dir, tiny_model_dir, overrides=FAST, snapshot_id="s")
    version = train_version(spec)

    manifest = read_manifest(version)
    assert set(manifest) == MANIFEST_KEYS
    assert (manifest["kind"], manifest["job"], manifest["adapter"]) == ("policy", job, True)
    assert manifest["base"] == str(tiny_model_dir.resolve())
    assert manifest["lora"]["r"] == 8 and manifest["lora"]["lora_alpha"] == 16
    assert set(manifest["lora"]["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
    dataset = {"dpo": "preference", "kto": "kto", "sft": "sft"}[job]
    assert manifest["data"][dataset]["train"] > 0
    assert manifest["metrics"]["steps"] == 3 and manifest["metrics"]["train_loss"] is not None
    assert manifest["metrics"]["heldout_loss"] is not None
    assert manifest["metrics"]["train_tokens"] > 0  # TRL's count, without padding
    assert (version / "tokenizer_config.json").exists()
    assert not (version / "ref").exists() and not version.with_name("v.tmp").exists()
    assert changes_outputs(version, tiny_model_dir)
    status = status_of(spec)
    assert (status["state"], status["progress"], status["step"]) == ("done", 1.0, 3)


def test_dpo_keeps_training_the_parent_adapter(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, sft_version: Path
) -> None:
    spec = spec_for(tmp_path, "dpo", data_dir, tiny_model_dir, parent=sft_version, overrides=FAST)
    version = train_version(spec)

    manifest = read_manifest(version)
    assert manifest["parent"] == "sft-1" and manifest["parent_path"] == str(sft_version.resolve())
    assert manifest["base"] == str(tiny_model_dir.resolve())  # still over the root base
    assert manifest["lora"]["r"] == read_manifest(sft_version)["lora"]["r"]
    assert changes_outputs(version, sft_version)


def test_lora_settings_of_an_adapter_parent_cannot_change(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, sft_version: Path
) -> None:
    spec = spec_for(
        tmp_path, "dpo", data_dir, tiny_model_dir, parent=sft_version, overrides={"lora.r": 4}
    )
    with pytest.raises(JobError, match="keeps its settings"):
        train_version(spec)
    assert not spec.out.exists()


def test_full_fine_tuning_writes_full_weights(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, sft_version: Path
) -> None:
    spec = spec_for(
        tmp_path, "sft", data_dir, tiny_model_dir, parent=sft_version, full=True, overrides=FAST
    )
    version = train_version(spec)

    manifest = read_manifest(version)
    assert manifest["adapter"] is False and manifest["lora"] is None
    assert (version / "model.safetensors").exists() and not is_adapter(version)
    assert changes_outputs(version, sft_version)


def test_rl_job_trains_against_the_reward_model(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, reward_version
) -> None:
    rm_dir, _ = reward_version
    spec = spec_for(
        tmp_path,
        "rl",
        data_dir,
        tiny_model_dir,
        reward_model=rm_dir,
        overrides={"max_steps": 2, "max_completion_length": 16},
    )
    version = train_version(spec)

    manifest = read_manifest(version)
    assert (manifest["kind"], manifest["job"], manifest["adapter"]) == ("policy", "rl", True)
    assert manifest["reward_model"] == str(rm_dir.resolve())
    assert manifest["config"]["num_generations"] == 4
    assert manifest["config"]["max_completion_length"] == 16
    # 64 + 16 prompts, each in all three datasets: the unique ones count once.
    assert manifest["data"] == {"prompts": {"train": 64, "too_long": 0, "heldout": 16}}
    assert manifest["metrics"]["train_reward_first"] is not None
    assert manifest["metrics"]["heldout_reward"] is not None
    assert changes_outputs(version, tiny_model_dir)


def test_rl_job_needs_a_reward_version(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, sft_version: Path
) -> None:
    with pytest.raises(JobError, match="needs a reward_model"):
        train_version(spec_for(tmp_path, "rl", data_dir, tiny_model_dir))
    spec = spec_for(tmp_path, "rl", data_dir, tiny_model_dir, reward_model=sft_version)
    with pytest.raises(JobError, match="not a reward model version"):
        train_version(spec)
    assert status_of(spec)["state"] == "failed"


def test_bon_job_trains_on_scored_pairs_and_the_peoples_pairs(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, reward_version
) -> None:
    import math

    rm_dir, _ = reward_version
    overrides = {"max_prompts": 8, "num_generations": 2, "max_completion_length": 8}
    spec = spec_for(
        tmp_path,
        "bon",
        data_dir,
        tiny_model_dir,
        reward_model=rm_dir,
        overrides={**overrides, "max_steps": 2},
    )
    version = train_version(spec)

    manifest = read_manifest(version)
    assert (manifest["kind"], manifest["job"], manifest["adapter"]) == ("policy", "bon", True)
    assert manifest["reward_model"] == str(rm_dir.resolve())
    assert {k: manifest["config"][k] for k in overrides} == overrides
    metrics = manifest["metrics"]
    assert metrics["sampled_prompts"] == 8 and metrics["steps"] == 2
    assert 0 < metrics["scored_pairs"] <= 8 and metrics["people_pairs"] == 64
    assert metrics["scored_margin_mean"] > 0
    assert 0 < metrics["scored_weight_mean"] <= math.tanh(metrics["scored_margin_mean"] / 2)
    assert metrics["heldout_loss"] is not None
    train = metrics["scored_pairs"] + metrics["people_pairs"]
    assert manifest["data"] == {"preference": {"train": train, "too_long": 0, "heldout": 16}}
    assert changes_outputs(version, tiny_model_dir)
    assert status_of(spec)["state"] == "done"


def test_jobs_answer_every_prompt_people_asked(tmp_path: Path) -> None:
    """The prompts `bon` and `rl` sample on: the `prompts` dataset's (asked, with feedback or
    not) with the other datasets' prompts; those alone from datasets built before it."""
    from tuneloop.train.job_common import unique_prompts

    data = write_datasets(tmp_path / "data", train_pairs=4, heldout_pairs=2)
    spec = JobSpec("bon", data, tmp_path / "base", tmp_path / "v", "v")

    def sampled() -> list[str]:
        return sorted(p[0]["content"] for p in unique_prompts(spec, tmp_path, "train")["prompt"])

    with_feedback = sampled()
    assert len(with_feedback) == 4
    asked = [{"prompt": msg("user", "Asked, never rated.")}]
    write_split(data, "prompts", "train", asked + [{"prompt": msg("user", with_feedback[0])}])
    assert sampled() == sorted([*with_feedback, "Asked, never rated."])


def test_bon_job_needs_a_reward_model(tmp_path: Path, data_dir: Path, tiny_model_dir: Path) -> None:
    spec = spec_for(tmp_path, "bon", data_dir, tiny_model_dir)
    with pytest.raises(JobError, match="needs a reward_model"):
        train_version(spec)
    assert not spec.out.exists() and status_of(spec)["state"] == "failed"


def test_scored_pairs_are_the_best_and_worst_answers_weighed_by_their_margin(
    tmp_path: Path, tiny_model_dir: Path, untrained_reward_dir: Path
) -> None:
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.train.sampling import sample_answers
    from tuneloop.train.scored_pairs import SAMPLE_BATCH, BestOfNConfig, score_pairs
    from tuneloop.train.scoring import RewardScorer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [msg("user", f"Question {i}: what about lists?") for i in range(6)]
    sampling = {"num_generations": 3, "max_completion_length": 8, "seed": 0}
    config, _ = build_config(BestOfNConfig, [sampling], output_dir=tmp_path)
    scored = score_pairs(model, tokenizer, untrained_reward_dir, prompts, config)

    # 8 random tokens never read alike: every prompt has a pair, and one.
    assert [p.prompt for p in scored] == prompts
    # The same answers again (same seed, same batches), each scored on its own.
    answers = sample_answers(
        model,
        tokenizer,
        prompts * 3,  # round k answers every prompt once
        max_tokens=8,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        batch_size=SAMPLE_BATCH,
    ).texts
    scorer = RewardScorer(untrained_reward_dir, device="cpu")
    for i, pair in enumerate(scored):
        mine = answers[i :: len(prompts)]
        scores = dict(zip(mine, scorer.score([pair.prompt] * 3, mine), strict=True))
        assert pair.chosen in scores and pair.rejected in scores
        good, bad = scores[pair.chosen], scores[pair.rejected]
        assert good == pytest.approx(max(scores.values()), abs=1e-4)
        assert bad == pytest.approx(min(scores.values()), abs=1e-4) and good > bad
        assert pair.margin == pytest.approx(good - bad, abs=1e-4)
        assert pair.weight == pytest.approx(math.tanh(pair.margin / 2))
        assert 0 < pair.weight < 1

    # Greedy answers read alike: nothing to pair.
    config.temperature = 0.0
    assert score_pairs(model, tokenizer, untrained_reward_dir, prompts, config) == []


# --- Failures -------------------------------------------------------------------------------------


def test_diverging_job_fails_and_leaves_no_version(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    spec = spec_for(
        tmp_path, "sft", data_dir, tiny_model_dir, overrides={"max_steps": 4, "learning_rate": 1e30}
    )
    with pytest.raises(JobError, match="training diverged"):
        train_version(spec)
    assert not spec.out.exists() and not spec.out.with_name("v.tmp").exists()
    status = status_of(spec)
    assert status["state"] == "failed" and "lower learning_rate" in status["error"]


def test_empty_train_split_fails_through_the_entry_point(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = write_datasets(tmp_path / "data", train_pairs=0, heldout_pairs=2)
    out, status_file = tmp_path / "models" / "dpo-1", tmp_path / "status.json"
    spec = JobSpec("dpo", data, tiny_model_dir, out, "dpo-1", status=status_file)
    proc = subprocess.run(
        [sys.executable, "-m", "tuneloop.train.run", spec.write(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    message = "no preference pairs in the train split: collect comparisons or thumbs first"
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_name("dpo-1.tmp").exists()
    status = json.loads(status_file.read_text())
    assert (status["state"], status["error"], status["job"]) == ("failed", message, "dpo")


def test_cancelled_job_cleans_up_and_reports(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    out, status_file = tmp_path / "sft-1", tmp_path / "status.json"
    settings = JobSettings(overrides={"max_steps": 100000, "logging_steps": 1})
    spec = JobSpec(
        "sft", data_dir, tiny_model_dir, out, "sft-1", status=status_file, settings=settings
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneloop.train.run", spec.write(tmp_path / "spec.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            status = json.loads(status_file.read_text()) if status_file.exists() else {}
            if status.get("step", 0) >= 1:
                break
            time.sleep(0.2)
        assert status.get("state") == "running" and status["total_steps"] == 100000
        assert status["stage"] == "training"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    status = json.loads(status_file.read_text())
    assert (status["state"], status["error"]) == ("failed", "cancelled (SIGTERM)")
    assert not out.exists() and not out.with_name("sft-1.tmp").exists()


def test_existing_output_dir_is_never_overwritten(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    spec = spec_for(tmp_path, "sft", data_dir, tiny_model_dir)
    spec.out.mkdir()
    (spec.out / "keep.txt").write_text("mine")
    with pytest.raises(JobError, match="already exists"):
        train_version(spec)
    assert (spec.out / "keep.txt").read_text() == "mine"


def test_thread_picker_sets_the_chosen_threads_for_each_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from tuneloop.train import job_callbacks

    picker = job_callbacks.ThreadPicker(2)
    clock, set_to = [0.0], []
    monkeypatch.setattr(job_callbacks.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(job_callbacks.torch, "set_num_threads", set_to.append)
    seconds = {1: 1.0, 2: 0.6}  # an idle machine: 2 threads are faster
    for step in range(6):
        picker.on_step_begin(None, SimpleNamespace(global_step=step), None)
        clock[0] += seconds[set_to[-1]]
        picker.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert set_to == [1, 1, 1, 2, 2, 2]  # the probe at step 3 won
    assert picker.chooser.steps_by_threads == {1: 3, 2: 3}


# --- Settings and data ----------------------------------------------------------------------------


def test_config_layers_file_then_set_flags(tmp_path: Path) -> None:
    from trl import DPOConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("learning_rate: 1e-4\nbeta: 0.3\nlora:\n  r: 4\n  lora_alpha: 8\n")
    flags = parse_overrides(["beta=0.5", "lora.r=16", "lr_scheduler_type=linear", "max_steps=7"])
    config, lora = build_config(
        DPOConfig, [{"beta": 0.1}, read_config_file(path), flags], output_dir=tmp_path / "t"
    )
    assert config.learning_rate == 1e-4  # YAML's "1e-4" string, converted for a float field
    assert config.beta == 0.5 and config.max_steps == 7
    assert config.lr_scheduler_type == "linear"
    assert config.report_to == [] and config.use_cpu and not config.bf16  # no CUDA here
    assert config.save_strategy == "no" and config.dataloader_num_workers == 0
    assert lora["r"] == 16 and lora["lora_alpha"] == 8 and "q_proj" in lora["target_modules"]


def test_models_of_smollm2_size_train_in_bf16_on_amx_with_accumulated_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file
    from trl import RewardConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_file({"a": torch.zeros(4, 5), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    assert count_parameters(tmp_path) == 23
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_amx(cpuinfo) and not cpu_has_amx(tmp_path / "none")

    monkeypatch.setattr(job_config, "cpu_has_amx", lambda: True)
    small, _ = build_config(RewardConfig, [], output_dir=tmp_path / "s", params=800_000)
    assert not small.bf16 and small.per_device_train_batch_size == 8
    large, _ = build_config(RewardConfig, [], output_dir=tmp_path / "l", params=134_515_008)
    assert large.bf16 and large.use_cpu
    assert (large.per_device_train_batch_size, large.gradient_accumulation_steps) == (4, 2)
    monkeypatch.setattr(job_config, "cpu_has_amx", lambda: False)
    no_amx, _ = build_config(RewardConfig, [], output_dir=tmp_path / "n", params=134_515_008)
    assert not no_amx.bf16


def test_unknown_config_keys_are_named(tmp_path: Path) -> None:
    from trl import DPOConfig

    with pytest.raises(JobError, match=r"unknown config key 'lerning_rate' for DPOConfig.*"):
        build_config(DPOConfig, [{"lerning_rate": 1.0}], output_dir=tmp_path)
    with pytest.raises(JobError, match=r"unknown config key 'lora.rank' for LoraConfig"):
        build_config(DPOConfig, [{"lora.rank": 4}], output_dir=tmp_path)
    with pytest.raises(SettingsError, match="key=value"):
        parse_overrides(["beta"])


def test_row_order_depends_on_the_seed_not_on_the_file(tmp_path: Path) -> None:
    a, b = write_datasets(tmp_path / "a"), write_datasets(tmp_path / "b")
    rows = pq.read_table(b / "preference.train.parquet").to_pylist()
    write_split(b, "preference", "train", rows[::-1])

    def order(data: Path, seed: int) -> list[str]:
        spec = JobSpec(
            "dpo", data, tmp_path, tmp_path / "out", "x", settings=JobSettings(seed=seed)
        )
        train, _ = load_dataset_splits(spec, tmp_path / "work", "preference")
        return [r["prompt"][0]["content"] for r in train]

    assert order(a, 0) == order(b, 0) != order(a, 1)
