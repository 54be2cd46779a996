"""The loop's settings, each defined once with its default: the job kinds, a job's training
settings, the gate's bar and the scheduler's trigger. The CLI's options, the admin API's request
and the arguments of a job process are all made from these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REWARD_JOB = "rm"
POLICY_JOBS = ("dpo", "kto", "sft", "rl")
JOBS = (REWARD_JOB, *POLICY_JOBS)
DEFAULT_POLICY_JOB = "dpo"
# What each job learns from, as the Operator tab and the CLI's help say it.
JOB_DESCRIPTIONS = {
    "rm": "reward model only",
    "dpo": "preference pairs",
    "kto": "thumbs up/down",
    "sft": "edits and liked answers",
    "rl": "sample, score with the reward model",
}

# The model `tuneloop up`, `train` and `simulate` start from when none is named or served.
DEFAULT_MODEL = "smollm2"


def check_job(kind: str, allowed: tuple[str, ...] = JOBS) -> str:
    """`kind`, or a ValueError naming the choices."""
    if kind not in allowed:
        raise ValueError(f"unknown job {kind!r}; choose one of {', '.join(allowed)}")
    return kind


@dataclass(frozen=True)
class JobSettings:
    """How one job trains: a YAML/JSON file of TRL config fields, then `key=value` overrides
    (`lora.<field>` for the adapter); `full` trains all weights instead of a LoRA adapter."""

    config_file: Path | None = None
    overrides: tuple[str, ...] = ()
    full: bool = False
    seed: int = 0

    def args(self) -> list[str]:
        """The job process's arguments (`tuneloop.train.run`)."""
        out = ["--seed", str(self.seed)]
        if self.config_file is not None:
            out += ["--config", str(self.config_file)]
        for item in self.overrides:
            out += ["--set", item]
        if self.full:
            out.append("--full")
        return out


@dataclass(frozen=True)
class GateSettings:
    """Promote when the candidate's win rate against the served policy (answers scored by the
    latest reward model on held-out prompts) is at least `min_win_rate` (its confidence interval's
    lower bound when `use_lower_bound`), and its KL to the parent is at most `max_kl`."""

    min_win_rate: float = 0.55
    use_lower_bound: bool = False
    max_kl: float | None = None
    max_prompts: int = 128
    max_tokens: int = 48
    temperature: float = 0.7
    mt_bench: Path | None = None  # default: the questions shipped with tuneloop.train

    def args(self) -> list[str]:
        """The gate process's arguments (`tuneloop.train.gate`)."""
        out = [
            "--min-win-rate",
            str(self.min_win_rate),
            "--limit",
            str(self.max_prompts),
            "--max-tokens",
            str(self.max_tokens),
            "--temperature",
            str(self.temperature),
        ]
        if self.use_lower_bound:
            out.append("--use-lower-bound")
        if self.max_kl is not None:
            out += ["--max-kl", str(self.max_kl)]
        if self.mt_bench is not None:
            out += ["--mt-bench", str(self.mt_bench)]
        return out


@dataclass(frozen=True)
class ScheduleSettings:
    """Retrain when at least `min_new_feedback` feedback rows arrived since the last snapshot,
    at most once every `every_minutes`. Off unless `enabled`. `kind` is the policy job of
    scheduled cycles and of the Operator tab's "train now"."""

    enabled: bool = False
    min_new_feedback: int = 200
    every_minutes: float = 30.0
    kind: str = DEFAULT_POLICY_JOB
    poll_seconds: float = 15.0
