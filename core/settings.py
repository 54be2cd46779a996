"""The loop's settings, each defined once with its default: the job kinds, a job's training
settings, the gate's bar and the scheduler's trigger. The CLI's options, the admin API's request
and the arguments of a job process are all made from these."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

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


def setting(
    default: Any, help: str, *, option: str | None = None, choices: Sequence[str] = ()
) -> Any:
    """A settings field with its default and help. `option` exposes it under that name: in the
    admin API's request, and on the command line with dashes (`gate_prompts`: `--gate-prompts`);
    see `options`."""
    return field(default=default, metadata={"help": help, "option": option, "choices": choices})


def options(settings_class: type) -> list[tuple[str, Field[Any]]]:
    """The exposed fields of a settings dataclass: (option name, field)."""
    return [(f.metadata["option"], f) for f in fields(settings_class) if f.metadata.get("option")]


class SettingsError(ValueError):
    """A setting given in a form that cannot be read; the message says which and how."""


@dataclass(frozen=True)
class JobSettings:
    """How one job trains: a YAML/JSON file of TRL config fields, then overrides of single
    fields (`lora.<field>` for the adapter; they win over the file); `full` trains all weights
    instead of a LoRA adapter. Handed to the job process inside its `JobSpec`."""

    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    full: bool = False
    seed: int = 0


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["learning_rate=1e-4", "lora.r=16"]` -> `{"learning_rate": 1e-4, "lora.r": 16}`: the
    `--set KEY=VALUE` form of the CLI and the admin API.

    Values are read as JSON where they parse (numbers, true/false, null, lists), else as YAML
    flow values, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


@dataclass(frozen=True)
class GateSettings:
    """Promote when the candidate's win rate against the served policy (answers scored by the
    latest reward model on held-out prompts) is at least `min_win_rate` (its confidence interval's
    lower bound when `use_lower_bound`), and its KL to the parent is at most `max_kl`."""

    min_win_rate: float = setting(
        0.55, "the gate's bar: win rate against the served policy", option="min_win_rate"
    )
    use_lower_bound: bool = setting(
        False,
        "the win rate's 95 % interval must clear the bar, not the win rate itself",
        option="gate_lower_bound",
    )
    max_kl: float | None = setting(
        None, "reject a candidate further than this KL from its parent", option="gate_max_kl"
    )
    max_prompts: int = setting(
        128, "held-out prompts the gate compares on, at most", option="gate_prompts"
    )
    max_tokens: int = setting(
        48, "length of the gate's answers, in tokens", option="gate_max_tokens"
    )
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16  # answers generated at once
    device: str | None = None  # default: cuda when available, else cpu
    mt_bench: Path | None = None  # default: the questions shipped with tuneloop.train

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_tokens < 1:
            raise SettingsError("the gate needs at least 1 prompt and 1 token per answer")
        if self.max_kl is not None and self.max_kl < 0:
            raise SettingsError(f"a KL limit is never negative, got {self.max_kl}")


@dataclass(frozen=True)
class ScheduleSettings:
    """Retrain when at least `min_new_feedback` feedback rows arrived since the last snapshot,
    at most once every `every_minutes`. Off unless `enabled`. `kind` is the policy job of
    scheduled cycles and of the Operator tab's "train now"."""

    enabled: bool = setting(
        False, "retrain on its own when enough new feedback arrived", option="schedule"
    )
    min_new_feedback: int = setting(
        200,
        "scheduled retraining: feedback rows since the last snapshot",
        option="min_new_feedback",
    )
    every_minutes: float = setting(
        30.0, "scheduled retraining: at most this often", option="every_minutes"
    )
    kind: str = setting(
        DEFAULT_POLICY_JOB,
        "the policy job of scheduled and 'train now' cycles",
        option="train_kind",
        choices=POLICY_JOBS,
    )
    poll_seconds: float = 15.0
