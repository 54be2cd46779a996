"""The loop's settings, each defined once with its default: the job kinds, a job's training
settings, the gate's bar and the scheduler's trigger. The CLI's options, the admin API's request
and the arguments of a job process are all made from these."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class JobKind:
    """A kind of training job. `trainer` is its function in the train layer, `module:function`,
    imported by the job process only; `policy`: it makes a policy (else a reward model);
    `simulated`: `tuneloop simulate`'s raters give the feedback it learns from; `scored`: it
    learns from the cycle's reward model (the `rm` version trained before it)."""

    name: str
    learns_from: str  # as the Operator tab and the CLI's help say it
    trainer: str
    policy: bool = True
    simulated: bool = True
    scored: bool = False


# Every job kind, in the order menus show them. A kind added here shows up in the CLI, the admin
# API, the Operator tab, the job spec and the job process.
JOB_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("rm", "reward model only", "tuneloop.train.reward_job:train_reward", policy=False),
        JobKind("dpo", "preference pairs", "tuneloop.train.policy_jobs:train_dpo"),
        JobKind("kto", "thumbs up/down", "tuneloop.train.policy_jobs:train_kto"),
        JobKind(
            "sft",
            "edits and liked answers",
            "tuneloop.train.policy_jobs:train_sft",
            simulated=False,
        ),
        JobKind(
            "bon",
            "best and worst of the policy's answers by the reward model, and the pairs",
            "tuneloop.train.scored_pairs:train_best_of_n",
            scored=True,
        ),
        JobKind(
            "rl",
            "sample, score with the reward model",
            "tuneloop.train.rl_job:train_rl",
            scored=True,
        ),
    )
}
DEFAULT_POLICY_JOB = "dpo"

# The model `tuneloop up`, `train` and `simulate` start from when none is named or served.
DEFAULT_MODEL = "smollm2"


def jobs() -> tuple[str, ...]:
    """The names of all job kinds."""
    return tuple(JOB_KINDS)


def policy_jobs() -> tuple[str, ...]:
    """The job kinds that make a policy."""
    return tuple(name for name, kind in JOB_KINDS.items() if kind.policy)


def simulated_jobs() -> tuple[str, ...]:
    """The policy jobs `tuneloop simulate` can run, or `auto`."""
    kinds = (name for name, kind in JOB_KINDS.items() if kind.policy and kind.simulated)
    return (*kinds, AUTO_JOB)


# A cycle's policy job chosen from the data its snapshot holds (`tuneloop.loop.job_choice`):
# DPO where preference pairs suffice, KTO where thumbs dominate, and so on.
AUTO_JOB = "auto"


def cycle_jobs() -> tuple[str, ...]:
    """What a training cycle may be asked to run: any job kind, or `auto`."""
    return (*jobs(), AUTO_JOB)


def scheduled_jobs() -> tuple[str, ...]:
    """The policy job of scheduled and "train now" cycles: a policy job, or `auto`."""
    return (*policy_jobs(), AUTO_JOB)


def check_job(kind: str, allowed: Callable[[], tuple[str, ...]] = jobs) -> str:
    """`kind`, or a SettingsError naming the choices."""
    if kind not in allowed():
        raise SettingsError(f"unknown job {kind!r}; choose one of {', '.join(allowed())}")
    return kind


def setting(
    default: Any,
    help: str,
    *,
    option: str | None = None,
    choices: Callable[[], Sequence[str]] | None = None,
    flag: str | None = None,
    positional: bool = False,
    metavar: str | None = None,
) -> Any:
    """A settings field with its default and help. `option` exposes it under that name: in the
    admin API's request, and on the command line with dashes (`gate_prompts`: `--gate-prompts`)
    unless `flag` names it otherwise, or as an argument when `positional`; `choices` gives the
    allowed values when asked (so that a kind added later is among them); `metavar` names a
    repeatable option's value in the help (default KEY=VALUE). See `options`."""
    metadata = {
        "help": help,
        "option": option,
        "choices": choices,
        "flag": flag,
        "metavar": metavar,
    }
    return field(default=default, metadata={**metadata, "positional": positional})


def options(settings_class: type) -> list[tuple[str, Field[Any]]]:
    """The exposed fields of a settings dataclass: (option name, field)."""
    return [(f.metadata["option"], f) for f in fields(settings_class) if f.metadata.get("option")]


def choices(f: Field[Any]) -> tuple[str, ...] | None:
    """The values a settings field allows, if it names them."""
    given = f.metadata.get("choices")
    return tuple(given()) if given else None


class SettingsError(ValueError):
    """A setting given in a form that cannot be read; the message says which and how."""


# The fields of TRL's configs (and `lora.` fields of PEFT's) that a job takes from an operator,
# through `--set`, a config file or the admin API. Nothing else: a request to train must not
# reach the network (hub uploads, report_to), other files (output or logging dirs, deepspeed
# configs) or the job's own wiring.
TRAINING_KEYS = frozenset(
    {
        # optimisation
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
        "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "adam_beta1",
        "adam_beta2", "adam_epsilon", "seed", "data_seed", "bf16", "fp16",
        "activation_checkpointing", "gradient_checkpointing", "logging_steps",
        # the objectives
        "beta", "loss_type", "loss_weights", "label_smoothing", "precompute_ref_log_probs",
        "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
        "assistant_only_loss", "completion_only_loss", "packing",
        # lengths and sampling
        "max_length", "max_prompt_length", "max_completion_length", "truncation_mode",
        "num_generations", "temperature", "top_p", "top_k", "epsilon", "num_iterations",
        "scale_rewards", "max_prompts",
        # the LoRA adapter
        "lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.target_modules",
        "lora.use_rslora", "lora.use_dora", "lora.bias",
    }
)  # fmt: skip


def check_training_keys(keys: Iterable[str]) -> None:
    """SettingsError for the first key a job may not take from an operator, with the closest
    one it may."""
    for key in sorted(keys):
        if key not in TRAINING_KEYS:
            close = difflib.get_close_matches(key, TRAINING_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(
                f"{key!r} is not a training setting a job takes{hint}; the ones it takes are "
                "listed in the README (Training jobs)"
            )


# How a job process starts (`tuneloop.loop.job_runner.job_command`): as one process, or under
# `accelerate launch`, which starts one process per device (or per `--num-processes`) with
# DDP, DeepSpeed ZeRO or FSDP as its config file says (examples/accelerate/).
LAUNCHERS = ("local", "accelerate")


def _launcher_setting() -> Any:
    return setting(
        "local",
        "how the training job starts: local (one process) or accelerate (`accelerate launch`, "
        "one process per device or per --num-processes, with DDP, DeepSpeed or FSDP as "
        "--accelerate-config says)",
        option="launcher",
        choices=lambda: LAUNCHERS,
    )


def _accelerate_config_setting() -> Any:
    return setting(
        None,
        "an accelerate config file for --launcher accelerate (examples/accelerate/; default: "
        "accelerate's own, from `accelerate config`)",
        option="accelerate_config",
    )


def _num_processes_setting() -> Any:
    return setting(
        None,
        "training processes for --launcher accelerate (default: the accelerate config's)",
        option="num_processes",
    )


@dataclass(frozen=True)
class LaunchSettings:
    """How a job process is started: `launcher` "local" runs `python -m tuneloop.train.run`,
    "accelerate" runs it under `accelerate launch` with `accelerate_config` and `num_processes`
    (None: the config's). Handed to the job inside its `JobSettings`, so that the manifest says
    how the version was trained. `CycleSettings` (a cycle asked for) and `ScheduleSettings` (the
    server's scheduled and "train now" cycles) expose the same three options."""

    launcher: str = _launcher_setting()
    accelerate_config: Path | None = _accelerate_config_setting()
    num_processes: int | None = _num_processes_setting()

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise SettingsError(
                f"unknown launcher {self.launcher!r}; choose one of {', '.join(LAUNCHERS)}"
            )
        if self.launcher == "local" and (
            self.accelerate_config is not None or self.num_processes is not None
        ):
            raise SettingsError(
                "--accelerate-config and --num-processes need --launcher accelerate"
            )
        if self.num_processes is not None and self.num_processes < 1:
            raise SettingsError(f"--num-processes is 1 or more, got {self.num_processes}")


@dataclass(frozen=True)
class JobSettings:
    """How one job trains: a YAML/JSON file of TRL config fields, then overrides of single
    fields (`lora.<field>` for the adapter; they win over the file); `full` trains all weights
    instead of a LoRA adapter. Handed to the job process inside its `JobSpec`."""

    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    full: bool = False
    seed: int = 0
    launch: LaunchSettings = field(default_factory=LaunchSettings)


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
class CycleSettings:
    """One training cycle as an operator asks for it (`tuneloop train`, `POST /v1/admin/train`,
    the Operator tab): the job and how it trains, whether the reward model is retrained on the
    new snapshot first, and whether the policy is gated (and promoted if it passes)."""

    kind: str = setting(
        DEFAULT_POLICY_JOB,
        "the job to run (auto: the policy job the snapshot's data calls for)",
        option="kind",
        choices=cycle_jobs,
        positional=True,
    )
    overrides: tuple[str, ...] = setting(
        (),
        "a field of the job's TRL config, KEY=VALUE (repeatable), e.g. learning_rate=1e-4",
        option="overrides",
        flag="--set",
    )
    config_file: Path | None = setting(
        None, "a YAML or JSON file of TRL config fields", option="config_file", flag="--config"
    )
    full: bool = setting(False, "train all weights, not a LoRA", option="full")
    seed: int = setting(0, "the seed of the job's data order and initialisation", option="seed")
    reward_overrides: tuple[str, ...] = setting(
        (),
        "a field of the RewardConfig of the reward model retrained in this cycle (repeatable)",
        option="reward_overrides",
        flag="--rm-set",
    )
    keep_reward: bool = setting(
        False,
        "gate with the current reward model instead of retraining it on the new snapshot",
        option="keep_reward",
    )
    gate: bool = setting(
        True,
        "gate the policy against the served one and promote it if it passes; without the "
        "gate it stays a candidate",
        option="gate",
        flag="--no-gate",
    )
    launcher: str = _launcher_setting()
    accelerate_config: Path | None = _accelerate_config_setting()
    num_processes: int | None = _num_processes_setting()

    def __post_init__(self) -> None:
        check_job(self.kind, cycle_jobs)
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "reward_overrides", tuple(self.reward_overrides))
        self.launch()  # a SettingsError now, not in the job

    def launch(self) -> LaunchSettings:
        """How the cycle's training jobs start (the gate runs as one process)."""
        return LaunchSettings(self.launcher, self.accelerate_config, self.num_processes)

    def job_settings(self) -> JobSettings:
        """How the cycle's job trains."""
        overrides = parse_overrides(self.overrides)
        check_training_keys(overrides)
        return JobSettings(
            config_file=self.config_file,
            overrides=overrides,
            full=self.full,
            seed=self.seed,
            launch=self.launch(),
        )

    def reward_settings(self) -> JobSettings:
        """How the cycle's reward model trains, when it is retrained."""
        overrides = parse_overrides(self.reward_overrides)
        check_training_keys(overrides)
        return JobSettings(overrides=overrides, seed=self.seed, launch=self.launch())


def clears_bar(stat: float, bar: float) -> bool:
    """Whether a candidate's win rate (or its interval's lower end) clears a gate's bar: at the
    bar counts. The reward model's gate and the human gate both decide with this."""
    return stat >= bar


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
    # On by default: a policy pulled far from its parent by a few hundred rows is more likely
    # poisoned or degenerate than better. The demo and SmolLM2 runs promoted so far were at
    # 0.06-0.51 nats per token (bench/RESULTS.md).
    max_kl: float | None = setting(
        1.0,
        "reject a candidate further than this KL (nats per token) from its parent",
        option="gate_max_kl",
    )
    # Sparse signals invite a policy to please the signal, not the person: longer, flattering
    # answers. A candidate whose answers on the gate's prompts are this many times as long as
    # its parent's (in tokens, mean) is refused whatever its win rate.
    max_length_ratio: float | None = setting(
        2.0,
        "reject a candidate whose answers are on average this many times as long as the served "
        "policy's (tokens, on the gate's prompts)",
        option="gate_max_length_ratio",
    )
    max_prompts: int = setting(
        128, "held-out prompts the gate compares on, at most", option="gate_prompts"
    )
    max_tokens: int = setting(
        48, "length of the gate's answers, in tokens", option="gate_max_tokens"
    )
    # The human gate (`tuneloop.loop.canary`): after the reward model's gate, people decide.
    human: bool = setting(
        False,
        "hold a candidate that passes in canary, answering a share of chats and judged by raters "
        "against the served version; promote it only if people prefer it",
        option="human_gate",
    )
    canary_share: float = setting(
        0.10, "the share of conversations a canary answers", option="canary_share"
    )
    human_judgments: int = setting(
        385,
        "human judgments (canary against served) before the human gate decides; 385 tell a 55 "
        "percent win rate from 50 at 95 percent confidence",
        option="human_gate_judgments",
    )
    human_min_win_rate: float = setting(
        0.5,
        "the human gate's bar: the lower end of the canary's win rate's 95 percent interval "
        "must clear it",
        option="human_gate_win_rate",
    )
    # One diligent rater, or one hostile one, must not decide alone: the gate waits until
    # enough raters have judged.
    human_max_rater_share: float = setting(
        0.25,
        "one rater's judgments count for at most this share of those the human gate waits for",
        option="human_gate_rater_share",
    )
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16  # answers generated at once
    device: str | None = None  # default: cuda when available, else cpu
    # The operator's own prompts, which come first: poisoned traffic cannot crowd them out.
    mt_bench: Path | None = setting(
        None,
        "the gate's fixed prompts, first: JSON lines with `prompt` (or MT-bench's `turns`); "
        "default: MT-bench's questions, shipped with tuneloop",
        option="gate_prompt_file",
    )

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_tokens < 1:
            raise SettingsError("the gate needs at least 1 prompt and 1 token per answer")
        if self.max_kl is not None and self.max_kl < 0:
            raise SettingsError(f"a KL limit is never negative, got {self.max_kl}")
        if self.max_length_ratio is not None and self.max_length_ratio <= 0:
            raise SettingsError(f"a length ratio is above 0, got {self.max_length_ratio}")
        if not 0 < self.canary_share <= 1 or self.human_judgments < 1:
            raise SettingsError(
                "a canary's share is above 0 and at most 1, and the human gate needs a judgment"
            )
        if not 0 < self.human_max_rater_share <= 1:
            raise SettingsError("one rater's share of the human gate is above 0 and at most 1")


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
        AUTO_JOB,
        "the policy job of scheduled and 'train now' cycles (auto: the one the snapshot's data "
        "calls for, with the reason recorded)",
        option="train_kind",
        choices=scheduled_jobs,
    )
    launcher: str = _launcher_setting()
    accelerate_config: Path | None = _accelerate_config_setting()
    num_processes: int | None = _num_processes_setting()
    poll_seconds: float = 15.0

    def __post_init__(self) -> None:
        self.launch()

    def launch(self) -> LaunchSettings:
        """How the training jobs of scheduled and "train now" cycles start."""
        return LaunchSettings(self.launcher, self.accelerate_config, self.num_processes)


@dataclass(frozen=True)
class LimitSettings:
    """How much one account of the user or rater role may ask of the server; operators and
    admins are not limited. 0 turns a limit off. Each is a bucket of that many requests that
    refills evenly over a minute: a burst up to the limit, then one request per 60/limit s."""

    feedback_per_minute: int = setting(
        120,
        "feedback rows one user or rater may send per minute (0: no limit)",
        option="feedback_per_minute",
    )
    chats_per_minute: int = setting(
        30,
        "answers one user or rater may ask for per minute (0: no limit)",
        option="chats_per_minute",
    )
    logins_per_minute: int = setting(
        10,
        "sign-in attempts to the UI per minute, from one address and for one account name "
        "(0: no limit)",
        option="logins_per_minute",
    )

    def __post_init__(self) -> None:
        if min(self.feedback_per_minute, self.chats_per_minute, self.logins_per_minute) < 0:
            raise SettingsError("a rate limit is a count per minute, 0 or more")


# Where a preference pair can come from (`tuneloop.feedback.datasets`): explicit judgments, then
# implicit signals.
PAIR_SOURCES = ("comparison", "ranking", "thumbs", "rating", "edit", "regenerate")
# Whose edits may become training targets (`TrustSettings.edits`).
EDIT_TRUST = ("trusted", "all")


@dataclass(frozen=True)
class TrustSettings:
    """Which feedback rows may train a model: those of enabled accounts and the operator's
    imports; rows whose rater is no account (from before accounts existed, or tests) only when
    `anonymous`. A disabled account's rows leave the next snapshot. Snapshots, and the
    scheduler's count of new rows, apply it; the preference dataset of a snapshot takes the pairs
    of `pair_sources` only (the implicit ones are weaker evidence)."""

    anonymous: bool = setting(
        False,
        "also train on feedback whose rater is no account (rows from before accounts)",
        option="trust_anonymous",
    )
    pair_sources: str = setting(
        "all",
        "the kinds of preference pairs training takes, comma-separated: explicit comparison, "
        "ranking; implicit thumbs, rating, edit, regenerate; or all",
        option="pair_sources",
    )
    # Operators' imports are exempt; raters are answered for by their agreement and gold
    # accuracy (quarantine), not by a share.
    max_user_share: float = setting(
        0.05,
        "one user account's share of a snapshot's preference pairs and KTO rows, at most (1: "
        "no cap); raters and imports are not capped",
        option="max_user_share",
    )
    edits: str = setting(
        "trusted",
        "whose edits become training targets: trusted (raters and above, and users an operator "
        "trusts: `tuneloop users trust NAME`) or all",
        option="trust_edits",
        choices=lambda: EDIT_TRUST,
    )
    # Off: every rater's judgment weighs 1 and no one is quarantined for a low weight, the
    # unweighted loop to compare against (`feedback.raters.apply_trust`).
    rater_weights: bool = setting(
        True,
        "weigh each rater's judgments in training by their trust weight (agreement and gold "
        "accuracy), and quarantine raters whose weight falls below 0.5",
        option="rater_weights",
        flag="--no-rater-weights",
    )

    def __post_init__(self) -> None:
        if not 0 < self.max_user_share <= 1:
            raise SettingsError(
                f"a user's share is above 0 and at most 1, got {self.max_user_share}"
            )
        unknown = set(self.sources()) - set(PAIR_SOURCES)
        if unknown:
            raise SettingsError(
                f"unknown pair source(s) {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(PAIR_SOURCES)}, or all"
            )

    def sources(self) -> tuple[str, ...]:
        """The pair sources admitted, in PAIR_SOURCES' order."""
        given = {s.strip() for s in self.pair_sources.split(",") if s.strip()}
        if given in ({"all"}, set()):
            return PAIR_SOURCES
        return tuple(s for s in PAIR_SOURCES if s in given) + tuple(
            sorted(given - set(PAIR_SOURCES))
        )


# How the rating queue orders tasks of normal priority (`tuneloop.serve.task_queue`).
TASK_SELECTIONS = ("oldest", "random", "active")
# Answers one rating task shows at most (the Rank tab has room for this many).
MAX_TASK_ANSWERS = 8


@dataclass(frozen=True)
class TaskSettings:
    """Rating tasks (`tuneloop.feedback.tasks`): how many raters judge each, and how many the
    server keeps waiting, made from new traffic as people chat (if the operator opts in, and
    while a canary runs)."""

    overlap: int = setting(
        3, "raters who judge each rating task (never the prompt's author)", option="task_overlap"
    )
    answers: int = setting(
        2,
        "answers per task made from traffic: 2 is a comparison, more a ranking",
        option="task_answers",
    )
    backlog: int = setting(
        10,
        "rating tasks the server keeps open, made from new traffic while --tasks-from-traffic "
        "or a canary runs (0: only when an operator asks, `tuneloop tasks make`)",
        option="task_backlog",
    )
    # Raters see the prompts people asked: no one's conversation goes to them unless the
    # operator says so. A canary's tasks are made all the same: holding a candidate in canary is
    # asking for them.
    from_traffic: bool = setting(
        False,
        "keep the backlog filled with tasks made from users' conversations (without it, only "
        "while a canary runs)",
        option="tasks_from_traffic",
    )
    selection: str = setting(
        "oldest",
        "which rating tasks raters get first (after a canary's and those begun): oldest, "
        "random, or active (those whose judgment would tell the reward model the most)",
        option="task_selection",
        choices=lambda: TASK_SELECTIONS,
    )
    gold_every: int = 10  # one fetch in this many offers a gold task first
    refill_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.overlap < 1 or not 2 <= self.answers <= MAX_TASK_ANSWERS or self.backlog < 0:
            raise SettingsError(
                f"a task's overlap is 1 or more, its answers 2 to {MAX_TASK_ANSWERS}, the "
                "backlog 0 or more"
            )
