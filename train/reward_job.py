"""Reward model: TRL's `RewardTrainer` on preference pairs (Bradley-Terry loss), each pair weighed
by its rater's trust weight (`train.weighted`), and on thumbs paired across prompts
(`train.reward_data`). Its held-out accuracy is on the held-out preference pairs only: answers
to one prompt, which is what the gate and the `bon` job ask of it.

The model is a sequence classifier with one output, its body initialised from the parent policy
(or the base model), trained with LoRA (the new `score` head trained in full) unless `--full`.
The version keeps merged full weights, so that scoring needs neither PEFT nor the base model:
`AutoModelForSequenceClassification.from_pretrained(version_dir)` loads it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification, PreTrainedModel
from trl import RewardConfig

from tuneloop.core.artifacts import base_model_path, is_adapter
from tuneloop.core.job_spec import JobSpec
from tuneloop.train.job_callbacks import job_callbacks
from tuneloop.train.job_common import (
    EMPTY_SPLIT_HINTS,
    JobOutput,
    StatusFile,
    check_finite,
    data_counts,
    job_settings,
    load_split_file,
    load_training_tokenizer,
    lora_config,
    seeded_order,
    size_training,
    train_metrics,
)
from tuneloop.train.job_config import JobError, config_dict, json_safe
from tuneloop.train.processes import job_processes
from tuneloop.train.reward_data import reward_rows
from tuneloop.train.weighted import WeightedRewardTrainer, relative_trust

DEFAULTS: dict[str, Any] = {"learning_rate": 1e-3, "max_length": 512}
# One epoch for a model of SmolLM2's size: on HH-RLHF it orders 0.64 of unseen pairs right after
# one (bench/rm_accuracy.py), and three took a cycle's reward model 20 of its 75 minutes.
LARGE_DEFAULTS: dict[str, Any] = {"num_train_epochs": 1}
STEP_CAP = 300


def train_reward(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    pairs = relative_trust(load_split_file(spec, work, "preference", "train"))
    heldout = load_split_file(spec, work, "preference", "heldout")
    thumbs = load_split_file(spec, work, "kto", "train")
    train = seeded_order(reward_rows(pairs, thumbs, seed=spec.settings.seed), spec.settings.seed)
    if len(train) == 0:
        raise JobError(EMPTY_SPLIT_HINTS["preference"])
    config, lora, _ = job_settings(spec, RewardConfig, DEFAULTS, work, LARGE_DEFAULTS)
    output = _train_and_save(spec, config, lora, train, heldout, work, status)
    if job_processes().main:  # the others saved nothing (`tuneloop.train.processes`)
        # Scored the way the gate scores, from the saved version (the trainer's copy is freed).
        output.metrics.update(heldout_accuracy(work, heldout))
    return output


def _train_and_save(
    spec: JobSpec,
    config: RewardConfig,
    lora: dict[str, Any],
    train: Any,
    heldout: Any,
    work: Path,
    status: StatusFile,
) -> JobOutput:
    """Train, save merged full weights and the tokenizer; what the job reports, less the
    held-out accuracy of the saved version."""
    tokenizer = load_training_tokenizer(spec)
    model = load_backbone(spec.parent or spec.base, pad_token_id=tokenizer.pad_token_id)
    full = spec.settings.full
    peft_config = None if full else lora_config(lora, "SEQ_CLS", modules_to_save=["score"])
    trainer = WeightedRewardTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=job_callbacks(status),
    )
    size_training(trainer, len(train), step_cap=STEP_CAP)
    result = trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    check_finite(trained)
    used_lora = None if spec.settings.full else json_safe(trained.peft_config["default"].to_dict())
    merged = trained if spec.settings.full else trained.merge_and_unload()
    if trainer.accelerator.is_main_process:
        merged.save_pretrained(work)
        tokenizer.save_pretrained(work)
    return JobOutput(
        kind="reward",
        adapter=False,
        base=spec.base,
        config=config_dict(trainer.args),
        metrics=train_metrics(trainer, result),
        data={"preference": data_counts(train, trainer, heldout), "sources": _sources(train)},
        lora=used_lora,
    )


def _sources(train: Any) -> dict[str, int]:
    """Rows offered to the trainer by where they came from (people's pairs by kind, thumbs
    paired across prompts), before it drops those over `max_length`."""
    return dict(sorted(Counter(train["source"]).items()))


def load_backbone(source: Path, *, pad_token_id: int) -> PreTrainedModel:
    """A one-output sequence classifier with the body of `source` (an adapter is merged in)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(source), num_labels=1
    )
    if is_adapter(source):  # a causal-LM adapter: load it untyped onto the classifier's body
        from peft import PeftConfig, PeftModel

        adapter_config = PeftConfig.from_pretrained(str(source))
        adapter_config.task_type = None
        model = PeftModel.from_pretrained(model, str(source), config=adapter_config)
        model = model.merge_and_unload()
    model.config.pad_token_id = pad_token_id
    return model


def heldout_accuracy(version: Path, heldout: Any) -> dict[str, Any]:
    """Fraction of held-out pairs where r(chosen) > r(rejected) (ties count half), and the mean
    margin r(chosen) - r(rejected); null when the held-out split is empty."""
    if len(heldout) == 0:
        return {"heldout_pairs": 0, "heldout_accuracy": None, "heldout_margin": None}
    from tuneloop.train.scoring import RewardScorer

    scorer = RewardScorer(version)
    prompts = list(heldout["prompt"])
    chosen = scorer.score(prompts, [r[-1]["content"] for r in heldout["chosen"]])
    rejected = scorer.score(prompts, [r[-1]["content"] for r in heldout["rejected"]])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {
        "heldout_pairs": len(margins),
        "heldout_accuracy": wins / len(margins),
        "heldout_margin": sum(margins) / len(margins),
    }
