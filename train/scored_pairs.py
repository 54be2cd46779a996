"""Best-of-n DPO: the policy's own answers, paired by the reward model, with the people's pairs.

People give few explicit preferences: a deployment's feedback is mostly thumbs, and raters are
expensive. A reward model trained on what there is generalises past it, and the policy can answer
any prompt people asked as often as wanted, rated or not. So, for each prompt people asked (the
train splits of the snapshot's `prompts` dataset and of the others; up to `max_prompts`), the
parent policy samples `num_generations` answers the way it would be served, the reward model
(the cycle's `rm` version) scores them, and the best and the worst become a pair; the
preference dataset's own pairs join them, with their raters' trust weights. DPO, with an SFT
term on the chosen answers (RPO, `BON_DEFAULTS`), then learns from both, through the weighted
loss of `train.weighted`.

A scored pair weighs w = 2 sigmoid(m) - 1 = tanh(m / 2), m the reward margin between its answers:
the reward model's own Bradley-Terry probability p that the better answer is better, read as a
trust weight the way a rater's is (w = 2p - 1, `feedback.raters`). Two answers the reward model
can barely tell apart then count little, and none of its pairs ever counts more than one person's.

This is the rejection-sampling recipe of iterative preference learning (Llama 2's rejection
sampling, "RLHF Workflow" by Dong et al. 2024, TRL's online DPO with a judge), done offline in one
pass: sampling once and training on a fixed set is what a 2-core CPU affords, and the next cycle
samples again from the policy this one made. Unlike online RL against the reward model (the `rl`
job), the pairs are fixed before training starts, so the policy cannot chase the reward model's
blind spots step by step; the gate still judges the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from trl import DPOConfig

from tuneloop.core.job_spec import JobSpec
from tuneloop.train.job_common import (
    JobOutput,
    StatusFile,
    job_settings,
    load_policy,
    load_split_file,
    load_training_tokenizer,
    seeded_order,
    unique_prompts,
)
from tuneloop.train.job_config import JobError
from tuneloop.train.policy_jobs import DPO_DEFAULTS, fit_policy
from tuneloop.train.weighted import WEIGHT, WeightedDPOTrainer, relative_trust

SAMPLE_BATCH = 32  # answers generated at once
SOURCE = "scored"  # the `source` of the reward model's pairs
# From LARGE_MODEL_PARAMS up, one epoch (as the reward model's): SmolLM2 on 2 CPU cores (Zen3, fp32,
# a loaded machine) took 65 s a DPO step, and three epochs over 128 scored and 131 people's pairs
# are 99 steps, most of two hours (bench/RESULTS.md).
LARGE_DEFAULTS: dict[str, Any] = {"num_train_epochs": 1}
# DPO with TRL's `sft` term beside it (RPO, Pang et al. 2024): the chosen answers' token NLL,
# weighted 1. The chosen answers are mostly the policy's own best samples, so the term is
# rejection-sampling fine-tuning and keeps the DPO push on the answers the reward model
# preferred. With the sigmoid loss alone, the demo model on one traffic run (`concise`, seed 0,
# 32 held-out questions) fitted its pairs without shortening its answers (length 0.99x, KL 0.50,
# win 0.73-0.80 on three tries); with the term, 0.60x, KL 0.06, win 0.91 (bench/RESULTS.md).
BON_DEFAULTS: dict[str, Any] = {
    **DPO_DEFAULTS,
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0, 1.0],
}


@dataclass
class BestOfNConfig(DPOConfig):
    """DPO's config and how the answers to pair are sampled."""

    num_generations: int = field(default=4, metadata={"help": "answers sampled per prompt"})
    # 128: on the demo model, 256 prompts (with the people's pairs, three epochs) drove the
    # policy past the gate's KL limit, its answers 1.4-1.7 times as long (bench/RESULTS.md);
    # and SmolLM2 on 2 CPU cores takes about 18 s a DPO step of 8 pairs in fp32.
    max_prompts: int = field(default=128, metadata={"help": "prompts sampled, at most"})
    max_completion_length: int = field(default=48, metadata={"help": "tokens per answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "sampling nucleus"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be 2 or more, got {self.num_generations}")
        if self.max_prompts < 1 or self.max_completion_length < 1:
            raise ValueError("max_prompts and max_completion_length must be 1 or more")


@dataclass(frozen=True)
class ScoredPair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float

    @property
    def weight(self) -> float:
        return math.tanh(self.margin / 2)


def train_best_of_n(spec: JobSpec, work: Path, status: StatusFile) -> JobOutput:
    if spec.reward_model is None:
        raise JobError("the bon job needs a reward_model: a version dir written by the rm job")
    people = relative_trust(load_split_file(spec, work, "preference", "train"))
    heldout = load_split_file(spec, work, "preference", "heldout")
    prompts = list(unique_prompts(spec, work, "train")["prompt"])
    if not prompts:
        raise JobError("no prompts in the train splits: collect feedback on some answers first")
    config, lora, lora_keys = job_settings(spec, BestOfNConfig, BON_DEFAULTS, work, LARGE_DEFAULTS)
    prompts = prompts[: config.max_prompts]
    tokenizer = load_training_tokenizer(spec)
    policy = load_policy(spec, lora, lora_keys)

    status.stage = "sampling"
    status.write("running", progress=0.0)
    scored = score_pairs(policy.model, tokenizer, spec.reward_model, prompts, config)
    if not scored and len(people) == 0:
        raise JobError(
            f"the reward model told none of the answers to {len(prompts)} prompts apart, and "
            "there are no preference pairs: collect more feedback first"
        )
    train = seeded_order(_with_people(people, scored), spec.settings.seed)
    status.stage = "training"
    margins = [p.margin for p in scored]
    return fit_policy(
        WeightedDPOTrainer,
        config,
        policy,
        tokenizer,
        train,
        heldout,
        work,
        status,
        dataset="preference",
        metrics={
            "sampled_prompts": len(prompts),
            "scored_pairs": len(scored),
            "people_pairs": len(people),
            "scored_margin_mean": sum(margins) / len(margins) if margins else None,
            "scored_weight_mean": sum(p.weight for p in scored) / len(scored) if scored else None,
        },
    )


def score_pairs(
    model: Any,
    tokenizer: Any,
    reward_model: Path,
    prompts: list[list[dict[str, str]]],
    config: BestOfNConfig,
) -> list[ScoredPair]:
    """Sample `config.num_generations` answers to each prompt, score them with the reward
    model, and pair the best with the worst; prompts whose answers all score alike (or read
    alike) give no pair."""
    from tuneloop.train.sampling import sample_answers
    from tuneloop.train.scoring import RewardScorer

    n = config.num_generations
    asked = [p for _ in range(n) for p in prompts]  # round k answers every prompt once
    was_training = model.training
    model.eval()
    sampled = sample_answers(
        model,
        tokenizer,
        asked,
        max_tokens=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        batch_size=SAMPLE_BATCH,
    )
    model.train(was_training)
    scorer = RewardScorer(reward_model, device=str(model.device), batch_size=SAMPLE_BATCH)
    scores = scorer.score(asked, sampled.texts)
    del scorer
    pairs = []
    for i, prompt in enumerate(prompts):
        answers = [(scores[j], sampled.texts[j]) for j in range(i, len(asked), len(prompts))]
        best, worst = max(answers), min(answers)
        if best[0] > worst[0] and best[1].strip() != worst[1].strip():
            pairs.append(ScoredPair(prompt, best[1], worst[1], best[0] - worst[0]))
    return pairs


def _with_people(people: datasets.Dataset, scored: list[ScoredPair]) -> datasets.Dataset:
    """The people's pairs (their columns as the preference dataset has them) and the scored
    ones, as one dataset."""
    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": [], "source": []}
    rows[WEIGHT] = []
    for row in people:
        for key in rows:
            rows[key].append(row.get(key, 1.0) if key == WEIGHT else row[key])
    for pair in scored:
        rows["prompt"].append(pair.prompt)
        rows["chosen"].append([{"role": "assistant", "content": pair.chosen}])
        rows["rejected"].append([{"role": "assistant", "content": pair.rejected}])
        rows["source"].append(SOURCE)
        rows[WEIGHT].append(pair.weight)
    return datasets.Dataset.from_dict(rows)
