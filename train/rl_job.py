"""Online RL: the policy samples answers to users' prompts and a reward model scores them.

TRL's `GRPOTrainer`: for each prompt it samples a group of answers, uses each answer's reward
relative to its group as the advantage (no value model to train, which a 2-core CPU and a small
policy both favour), and takes PPO-style clipped steps. RLOO's leave-one-out baseline would do
as well; GRPO is TRL's most used online trainer, with its loss variants and reward scaling.
A KL penalty (`beta`) to the root base keeps the policy from gaming the learned reward.

Prompts are the unique prompts people asked (the train splits of the `prompts` dataset and of
the others; up to 32 held-out ones give the held-out reward); the reward model is a version
written by the `rm` job (the spec's `reward_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification
from trl import GRPOConfig, GRPOTrainer

from tuneloop.core.artifacts import load_tokenizer, read_manifest
from tuneloop.core.job_spec import JobSpec
from tuneloop.train.job_callbacks import job_callbacks
from tuneloop.train.job_common import (
    JobOutput,
    StatusFile,
    data_counts,
    heldout_metrics,
    job_settings,
    load_policy,
    load_training_tokenizer,
    save_policy,
    size_training,
    train_metrics,
    unique_prompts,
    use_base_as_reference,
)
from tuneloop.train.job_config import JobError, config_dict

STEP_CAP = 40
DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-4,
    "beta": 0.05,
    "num_generations": 4,
    "max_completion_length": 40,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    # GRPO samples once per accumulation window: accumulating would double the answers per step.
    "gradient_accumulation_steps": 1,
}
# Sampling answers is most of an RL job's time; the gate is the real evaluation.
HELDOUT_PROMPTS = 32


def train_rl(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    train, heldout = (unique_prompts(spec, work, split) for split in ("train", "heldout"))
    heldout = heldout.select(range(min(len(heldout), HELDOUT_PROMPTS)))
    if len(train) == 0:
        raise JobError("no prompts in the train splits: collect feedback on some answers first")
    reward_model, reward_tokenizer = load_reward_model(spec.reward_model)
    config, lora, lora_keys = job_settings(spec, GRPOConfig, DEFAULTS, work)
    prompts_per_step = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps
    ) // config.num_generations
    tokenizer = load_training_tokenizer(spec, padding_side="left")
    policy = load_policy(spec, lora, lora_keys)
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=reward_model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        peft_config=policy.peft_config,
        callbacks=job_callbacks(status),
    )
    size_training(trainer, len(train), step_cap=STEP_CAP, rows_per_step=prompts_per_step)
    use_base_as_reference(trainer)
    result = trainer.train()
    saved_lora = save_policy(trainer, tokenizer, work)
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    metrics = {
        **train_metrics(trainer, result),
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        **heldout_metrics(trainer, heldout),
    }
    return JobOutput(
        kind="policy",
        adapter=saved_lora is not None,
        base=policy.base,
        config=config_dict(trainer.args),
        metrics=metrics,
        data={"prompts": data_counts(train, trainer, heldout)},
        lora=saved_lora,
    )


def load_reward_model(path: Path | None) -> tuple[Any, Any]:
    """The reward version at `path` (merged full weights) and its tokenizer."""
    if path is None:
        raise JobError("the rl job needs a reward_model: a version dir written by the rm job")
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None or manifest.get("kind") != "reward":
        raise JobError(f"{path} is not a reward model version (train one with the rm job)")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer
