"""Offline policy jobs: DPO on preference pairs, KTO on thumbs, SFT on edits and good answers.

Each trains the parent policy's adapter (or a new LoRA adapter over the base, or all weights
with `--full`) with TRL's own trainer and saves the result as a policy version; DPO weighs each
pair by its rater's trust weight (`train.weighted`). The reference
model of DPO and KTO is the root base model (see `job_common.use_base_as_reference`).

The defaults suit the small demo model with LoRA (a high learning rate, short sequences); a
larger model wants `--set learning_rate=...` and `--set max_length=...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import DPOConfig, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from tuneloop.core.job_spec import JobSpec
from tuneloop.train.job_callbacks import job_callbacks
from tuneloop.train.job_common import (
    JobOutput,
    Policy,
    StatusFile,
    data_counts,
    heldout_metrics,
    job_settings,
    load_dataset_splits,
    load_policy,
    load_training_tokenizer,
    save_policy,
    size_training,
    train_metrics,
    use_base_as_reference,
)
from tuneloop.train.job_config import config_dict
from tuneloop.train.weighted import WeightedDPOTrainer, relative_trust

if TYPE_CHECKING:
    import datasets

STEP_CAP = 200
DPO_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-4, "beta": 0.1, "max_length": 512}
KTO_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-4, "beta": 0.1, "max_length": 512}
SFT_DEFAULTS: dict[str, Any] = {"learning_rate": 1e-3, "max_length": 512}


def train_dpo(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    tokenizer = load_training_tokenizer(spec)
    return _train(
        spec, work, status, tokenizer, "preference", DPOConfig, WeightedDPOTrainer, DPO_DEFAULTS
    )


def train_kto(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    tokenizer = load_training_tokenizer(spec)
    return _train(spec, work, status, tokenizer, "kto", KTOConfig, KTOTrainer, KTO_DEFAULTS)


def train_sft(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    tokenizer = load_training_tokenizer(spec)
    # The dataset is prompt and completion: TRL's loss falls on the completion only.
    return _train(spec, work, status, tokenizer, "sft", SFTConfig, SFTTrainer, SFT_DEFAULTS)


def _train(
    spec: JobSpec,
    work: Path,
    status: StatusFile,
    tokenizer: Any,
    dataset: str,
    config_cls: type,
    trainer_cls: type,
    defaults: dict[str, Any],
) -> JobOutput:
    train, heldout = load_dataset_splits(spec, work, dataset)
    if trainer_cls is WeightedDPOTrainer:
        train = relative_trust(train)
    config, lora, lora_keys = job_settings(spec, config_cls, defaults, work)
    policy = load_policy(spec, lora, lora_keys)
    return fit_policy(
        trainer_cls, config, policy, tokenizer, train, heldout, work, status, dataset=dataset
    )


def fit_policy(
    trainer_cls: type,
    config: Any,
    policy: Policy,
    tokenizer: Any,
    train: datasets.Dataset,
    heldout: datasets.Dataset,
    work: Path,
    status: StatusFile,
    *,
    dataset: str,
    metrics: dict[str, Any] | None = None,
) -> JobOutput:
    """Train `policy` on `train` with TRL's `trainer_cls`, evaluate on `heldout`, save into
    `work`; the job's output, `metrics` added to the trainer's."""
    trainer = trainer_cls(
        model=policy.model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=job_callbacks(status),
    )
    size_training(trainer, len(train), step_cap=STEP_CAP)
    use_base_as_reference(trainer)
    result = trainer.train()
    saved_lora = save_policy(trainer, tokenizer, work)
    return JobOutput(
        kind="policy",
        adapter=saved_lora is not None,
        base=policy.base,
        config=config_dict(trainer.args),
        metrics={
            **train_metrics(trainer, result),
            **(metrics or {}),
            **heldout_metrics(trainer, heldout),
        },
        data={dataset: data_counts(train, trainer, heldout)},
        lora=saved_lora,
    )
