"""Pieces every training job shares: the job's inputs, its status file, its data, the policy it
starts from, and the manifest of the version it writes.

Policy versions follow `tuneloop.core.artifacts`: each is one LoRA adapter over the root base model.
A job whose parent is an adapter keeps training that adapter; a parent with full weights (a
`--full` version, or a plain checkpoint) gets a new adapter over its weights, and its path is
then the `base` of the new version. `--full` trains all weights and writes full weights.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tuneloop
from tuneloop.core.artifacts import base_model_path, is_adapter, read_manifest
from tuneloop.core.files import write_json_atomic
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.settings import check_training_keys
from tuneloop.train.job_config import (
    LARGE_MODEL_PARAMS,
    JobError,
    build_config,
    count_parameters,
    json_safe,
    read_config_file,
    resolve_max_steps,
    user_lora_keys,
)

if TYPE_CHECKING:
    import datasets
    from peft import LoraConfig
    from transformers import PreTrainedModel

# The error when a dataset's train split is empty: what to collect first.
EMPTY_SPLIT_HINTS = {
    "preference": "no preference pairs in the train split: collect comparisons or thumbs first",
    "kto": "no KTO rows in the train split: collect thumbs up and down first",
    "sft": "no SFT rows in the train split: collect edits or ratings of 4-5 first",
}


@dataclass
class JobOutput:
    """What a job function reports after saving its model and tokenizer into the work dir."""

    kind: str  # "policy" | "reward"
    adapter: bool
    base: Path  # the full weights the saved adapter applies to (the root base for full weights)
    config: dict[str, Any]
    metrics: dict[str, Any]
    data: dict[str, dict[str, int]]
    lora: dict[str, Any] | None = None


class StatusFile:
    """The job's progress as one JSON document, replaced atomically on every write. `stage` says
    what it is doing (loading, training, evaluating and saving; the gate: comparing); the loop's
    job runner copies it into the run's row."""

    def __init__(self, path: Path | None, job: str, version_id: str) -> None:
        self.path, self.job, self.version_id = path, job, version_id
        self.stage = "loading"
        self.step, self.total_steps, self.loss = 0, 0, None
        self.metrics: dict[str, Any] = {}

    def write(self, state: str, *, progress: float | None = None, error: str | None = None) -> None:
        if self.path is None:
            return
        if progress is None:
            progress = self.step / self.total_steps if self.total_steps else 0.0
        doc = {
            "job": self.job,
            "version_id": self.version_id,
            "state": state,
            "stage": self.stage,
            "step": self.step,
            "total_steps": self.total_steps,
            "progress": round(min(max(progress, 0.0), 1.0), 4),
            "loss": self.loss,
            "metrics": self.metrics,
            "error": error,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        write_json_atomic(self.path, json_safe(doc))


def job_settings(
    spec: JobSpec,
    config_cls: type,
    defaults: dict[str, Any],
    work: Path,
    large_defaults: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any], list[str]]:
    """The TRL config, the LoRA settings and the LoRA keys the operator set.

    Layers: shared and device defaults (by the base model's size), the job's defaults, its
    `large_defaults` for a base of LARGE_MODEL_PARAMS and up, `--seed`, the config file, `--set`
    values."""
    given = spec.settings
    user = [read_config_file(given.config_file) if given.config_file else {}, given.overrides]
    check_training_keys(key for layer in user for key in layer)
    seed = {"seed": given.seed, "data_seed": given.seed}
    params = count_parameters(spec.base)
    sized = (large_defaults or {}) if params >= LARGE_MODEL_PARAMS else {}
    layers = [defaults, sized, seed, *user]
    config, lora = build_config(config_cls, layers, output_dir=scratch_dir(work), params=params)
    return config, lora, user_lora_keys(user)


# --- Data -----------------------------------------------------------------------------------------


def split_path(spec: JobSpec, name: str, split: str) -> Path:
    path = spec.datasets / f"{name}.{split}.parquet"
    if not path.exists():
        raise JobError(f"dataset file not found: {path} (build datasets from a snapshot first)")
    return path


def scratch_dir(work: Path) -> Path:
    """The trainer's output dir and the datasets cache: removed before the version is renamed."""
    return work / ".trainer"


def load_split_file(spec: JobSpec, work: Path, name: str, split: str) -> datasets.Dataset:
    """One split, its `datasets` cache in the job's scratch dir (not the user's cache)."""
    from tuneloop.feedback.datasets import load_split

    return load_split(split_path(spec, name, split), cache_dir=scratch_dir(work) / "cache")


PROMPT_SOURCES = ("prompts", "preference", "kto", "sft")


def unique_prompts(spec: JobSpec, work: Path, split: str) -> datasets.Dataset:
    """The distinct prompts of every dataset's `split`, as a `prompt` column, in a seeded order.
    Datasets built before the `prompts` dataset existed have none: their others' prompts then."""
    import datasets

    seen: dict[str, list[dict[str, str]]] = {}
    for name in PROMPT_SOURCES:
        if name == "prompts" and not (spec.datasets / f"{name}.{split}.parquet").exists():
            continue
        for prompt in load_split_file(spec, work, name, split)["prompt"]:
            seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    prompts = [seen[key] for key in sorted(seen)]
    data = datasets.Dataset.from_dict({"prompt": prompts})
    return data.shuffle(seed=spec.settings.seed).flatten_indices() if prompts else data


def load_dataset_splits(
    spec: JobSpec, work: Path, name: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and held-out splits of dataset `name`, each in a seeded shuffled order.

    Row order in the files is unspecified, so rows are first sorted by a hash of their content:
    the same snapshot and seed then give the same training order."""
    train, heldout = (
        seeded_order(load_split_file(spec, work, name, split), spec.settings.seed)
        for split in ("train", "heldout")
    )
    if len(train) == 0:
        raise JobError(EMPTY_SPLIT_HINTS[name])
    return train, heldout


def seeded_order(data: datasets.Dataset, seed: int) -> datasets.Dataset:
    keys = [
        hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
        for row in data
    ]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    random.Random(seed).shuffle(order)
    return data.select(order).flatten_indices() if order else data


# --- Models ---------------------------------------------------------------------------------------


@dataclass
class Policy:
    """The model a policy job trains and what its saved version applies to."""

    model: PreTrainedModel
    peft_config: LoraConfig | None  # a new adapter for the trainer to add; None: train `model`
    base: Path


def load_policy(spec: JobSpec, lora: dict[str, Any], user_lora_keys: list[str]) -> Policy:
    """The parent policy (or the base model), ready to train.

    An adapter parent is loaded trainable over the root base (its LoRA settings are kept, so
    setting `lora.*` is an error); with `--full` it is merged first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = spec.base.resolve()
    parent = spec.parent
    if parent is not None and is_adapter(parent):
        _check_same_base(parent, root)
        if user_lora_keys and not spec.settings.full:
            raise JobError(
                f"{', '.join(user_lora_keys)}: the parent is a LoRA adapter and keeps its settings"
            )
        model = AutoModelForCausalLM.from_pretrained(root)
        model = PeftModel.from_pretrained(model, str(parent), is_trainable=not spec.settings.full)
        if spec.settings.full:  # PEFT froze the base weights: unfreeze them once merged
            return Policy(model.merge_and_unload().requires_grad_(True), None, root)
        return Policy(model, None, root)
    source = (parent or root).resolve()
    model = AutoModelForCausalLM.from_pretrained(source)
    if spec.settings.full:
        return Policy(model, None, root)
    return Policy(model, lora_config(lora, "CAUSAL_LM"), source)


def lora_config(settings: dict[str, Any], task_type: str, **extra: Any) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **settings, **extra)


def _check_same_base(parent: Path, root: Path) -> None:
    parent_base = Path(base_model_path(parent))
    if parent_base.exists() and parent_base.resolve() != root:
        raise JobError(f"parent {parent} is an adapter over {parent_base}, not over --base {root}")


def use_base_as_reference(trainer: Any) -> None:
    """Make the root base (adapter disabled) the reference model of DPO, KTO and GRPO.

    Given a model that already holds an adapter, TRL copies it into a frozen "ref" adapter: the
    reference would be the parent policy, and each round could drift a further KL budget away
    from the base. Without "ref", TRL disables the adapter for reference passes, so every round
    optimises the same objective against the base (the SFT model of the classic pipeline)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def load_training_tokenizer(spec: JobSpec, padding_side: str = "right") -> Any:
    from tuneloop.core.artifacts import load_tokenizer

    tokenizer = load_tokenizer(spec.parent or spec.base)
    tokenizer.padding_side = padding_side
    return tokenizer


def check_finite(model: PreTrainedModel) -> None:
    """Refuse to save weights that diverged (a last step can break them after the last log)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not param.detach().isfinite().all():
            raise JobError(f"training diverged: {name} holds NaN or inf; lower learning_rate")


def save_policy(trainer: Any, tokenizer: Any, work: Path) -> dict[str, Any] | None:
    """Save the trained adapter (or full weights) and the tokenizer; returns the LoRA config.

    With several processes every rank calls this: the state dict is gathered from all of them
    (DeepSpeed ZeRO-3 and FSDP shard it), and rank 0 alone writes."""
    accelerator = trainer.accelerator
    state = accelerator.get_state_dict(trainer.model) if accelerator.num_processes > 1 else None
    if not accelerator.is_main_process:  # its JobOutput is not used (`train.run`)
        return None
    model = accelerator.unwrap_model(trainer.model)
    check_finite(model)
    model.save_pretrained(work, state_dict=state)
    tokenizer.save_pretrained(work)
    if is_adapter(work):
        return json_safe(model.peft_config["default"].to_dict())
    return None


def train_metrics(trainer: Any, result: Any) -> dict[str, Any]:
    """Last logged train loss, the logged losses by step (`[[step, loss], ...]`), mean loss over
    the run, steps, runtime, and the tokens trained on (TRL's `num_tokens`: without padding, over
    all processes; None where the trainer does not count them)."""
    history = trainer.state.log_history
    logged = [(log["step"], log["loss"]) for log in history if "loss" in log]
    losses = [loss for _, loss in logged]
    tokens = [log["num_tokens"] for log in history if "num_tokens" in log]
    return {
        "train_loss": losses[-1] if losses else None,
        "train_loss_curve": [[step, loss] for step, loss in logged],
        "train_loss_mean": result.training_loss,
        "steps": trainer.state.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "train_tokens": int(tokens[-1]) if tokens else None,
    }


def size_training(
    trainer: Any, offered: int, *, step_cap: int, rows_per_step: int | None = None
) -> None:
    """Set the trainer's `max_steps`, unless given, from the rows it kept: TRL drops over-long
    rows as it builds the trainer (see `data_counts`), after the config was made, and packing
    joins rows. A dataset it dropped entirely is refused here, not deep in the training loop."""
    kept = len(trainer.train_dataset)
    if kept == 0:
        limit = getattr(trainer.args, "max_length", None)
        raise JobError(
            f"all {offered} train rows are over max_length={limit}: nothing left to train on; "
            "raise it with --set max_length=N"
        )
    resolve_max_steps(trainer.args, kept, step_cap=step_cap, rows_per_step=rows_per_step)


def data_counts(
    offered: datasets.Dataset, trainer: Any, heldout: datasets.Dataset
) -> dict[str, int]:
    """The manifest's account of one dataset: rows the trainer trained on, rows it left out as
    too long, held-out rows. TRL filters silently when it prepares the data: the reward trainer
    drops a pair with either side over `max_length`, DPO and KTO an example whose prompt alone
    fills it. Packing (SFT's `packing=True`) joins rows, and drops none."""
    packed = getattr(trainer.args, "packing", False)
    trained = len(offered) if packed else len(trainer.train_dataset)
    return {"train": trained, "too_long": len(offered) - trained, "heldout": len(heldout)}


def heldout_metrics(trainer: Any, heldout: datasets.Dataset) -> dict[str, Any]:
    """The trainer's own evaluation on the held-out split, keys `eval_*` renamed `heldout_*`."""
    if len(heldout) == 0:
        return {"heldout_rows": 0}
    results = trainer.evaluate(eval_dataset=heldout)
    renamed = {"heldout_" + k.removeprefix("eval_"): v for k, v in results.items()}
    return {"heldout_rows": len(heldout), **renamed}


# --- Manifest -------------------------------------------------------------------------------------


def build_manifest(
    job: str, spec: JobSpec, output: JobOutput, world_size: int = 1
) -> dict[str, Any]:
    """The version's manifest; `launcher` and `world_size` say how many processes trained it,
    and how they were started."""
    return json_safe(
        {
            "id": spec.version_id,
            "kind": output.kind,
            "job": job,
            "launcher": spec.settings.launch.launcher,
            "world_size": world_size,
            "base": str(output.base.resolve()),
            "parent": spec.parent_id or _parent_id(spec.parent),
            "parent_path": str(spec.parent.resolve()) if spec.parent else None,
            "adapter": output.adapter,
            "snapshot_id": spec.snapshot_id,
            "config": output.config,
            "lora": output.lora,
            "settings": asdict(spec.settings),
            "reward_model": str(spec.reward_model.resolve()) if spec.reward_model else None,
            "metrics": output.metrics,
            "code_version": code_version(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": output.data,
        }
    )


def _parent_id(parent: Path | None) -> str | None:
    if parent is None:
        return None
    return (read_manifest(parent) or {}).get("id")


def code_version() -> str:
    """`tuneloop.__version__`, plus `git describe` of the source tree where there is one."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(tuneloop.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{tuneloop.__version__}+{described}" if described else tuneloop.__version__
