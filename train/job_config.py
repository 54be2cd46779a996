"""Training-job settings: TRL's own config dataclasses, with defaults for small models on a CPU.

A job's settings come, lowest precedence first, from: the defaults every job shares (here), the
job's own defaults, a YAML or JSON file (`--config`), and `--set key=value` flags. Keys are the
fields of the job's TRL config (`DPOConfig`, `RewardConfig`, ...), plus `lora.<field>` for the
`peft.LoraConfig` of LoRA jobs (in a file, also a `lora:` mapping). An unknown key is an error
that names the config class and the closest known key.

Unless `max_steps` is set, a job runs `num_train_epochs` over its data, up to a cap per job (300
steps for the reward model, 200 for DPO, KTO and SFT, 40 for RL): the demo loop retrains every
few minutes on a 2-core machine.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

LORA_PREFIX = "lora."
# Every attention and MLP projection of Llama-style models.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": list(LORA_TARGETS),
}

# Shared by every job (where they differ from TRL's defaults, or matter here). Logging every 5% of
# the steps gives the status file about 20 updates per run.
COMMON_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "num_train_epochs": 3,
    "max_steps": -1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "logging_steps": 0.05,
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
    "activation_checkpointing": False,
    "disable_tqdm": True,
    # Log NaN losses as they are (the default hides them), so that a diverged job fails.
    "logging_nan_inf_filter": False,
}


# Settings the jobs make themselves: the trainer's scratch dir, the model's task, the reward head.
RESERVED_CONFIG_KEYS = {"output_dir"}
RESERVED_LORA_KEYS = {"task_type", "modules_to_save"}


class JobError(Exception):
    """A failure the operator can act on; its message is the one-line reason shown to them."""


# From this size up (SmolLM2-135M, not the 0.8M demo model) a CPU job trains in bf16 autocast
# where the CPU has AMX, and with half the batch accumulated over two micro-batches. Measured on
# SmolLM2-135M with 2 cores (bench/RESULTS.md): bf16 takes 0.59x the time of an fp32 DPO step and
# 0.77x of a reward-model step, and the reward model at batch 8 x 512 tokens peaked at 24.2 GB;
# 4 x 2 makes the same 8-row steps in about half the activation memory. The demo model's matmuls
# are too small for AMX to pay for the conversions.
LARGE_MODEL_PARAMS = 50_000_000


def device_defaults(params: int = 0) -> dict[str, Any]:
    """CPU when there is no CUDA device; bf16 on a CUDA device that supports it, and on a CPU
    with AMX for a model of `params` >= LARGE_MODEL_PARAMS, which then also accumulates 2
    micro-batches of 4."""
    import torch

    if torch.cuda.is_available():
        return {"use_cpu": False, "bf16": torch.cuda.is_bf16_supported(), "fp16": False}
    if params < LARGE_MODEL_PARAMS:
        return {"use_cpu": True, "bf16": False, "fp16": False}
    return {
        "use_cpu": True,
        "bf16": cpu_has_amx(),
        "fp16": False,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
    }


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has AMX bf16 tiles (Sapphire Rapids and later), as Linux reports it."""
    try:
        return " amx_bf16" in cpuinfo.read_text()
    except OSError:
        return False


def count_parameters(model_dir: Path) -> int:
    """The parameters in a model dir's safetensors files, from their headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def read_config_file(path: Path) -> dict[str, Any]:
    """A flat key -> value mapping from a YAML or JSON file; a `lora:` mapping becomes `lora.*`."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise JobError(f"cannot read config file {path}: {e.strerror}") from e
    data = _load_mapping(text, Path(path))
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "lora" and isinstance(value, dict):
            flat.update({LORA_PREFIX + str(k): v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def build_config(
    config_cls: type,
    layers: Sequence[Mapping[str, Any]],
    *,
    output_dir: Path,
    params: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """The TRL config and the LoRA settings from `layers` (later layers win).

    `COMMON_DEFAULTS` and `device_defaults(params)` (`params`: the model's size) come first;
    `output_dir` is the scratch dir the trainer may write to (nothing is saved there with
    `save_strategy="no"`)."""
    merged: dict[str, Any] = {**COMMON_DEFAULTS, **device_defaults(params)}
    lora = dict(LORA_DEFAULTS)
    for layer in layers:
        for key, value in layer.items():
            if key.startswith(LORA_PREFIX):
                lora[key[len(LORA_PREFIX) :]] = value
            else:
                merged[key] = value
    _check_keys(config_cls.__name__, merged, _init_fields(config_cls), RESERVED_CONFIG_KEYS)
    _check_keys("LoraConfig", lora, _lora_fields(), RESERVED_LORA_KEYS)
    hints = typing.get_type_hints(config_cls)
    kwargs = {key: _coerce(value, hints.get(key)) for key, value in merged.items()}
    try:
        config = config_cls(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as e:
        raise JobError(f"invalid {config_cls.__name__}: {_one_line(e)}") from e
    return config, lora


def user_lora_keys(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The LoRA keys the operator set (defaults aside)."""
    return sorted({k for layer in layers for k in layer if k.startswith(LORA_PREFIX)})


def resolve_max_steps(
    config: Any, rows: int, *, step_cap: int, rows_per_step: int | None = None
) -> None:
    """Set `config.max_steps`, unless given: `num_train_epochs` over `rows`, at most `step_cap`.

    `rows_per_step` is the number of dataset rows one optimizer step consumes on one process
    (default: the batch size times the gradient accumulation steps); every process of a
    multi-process job (`config.world_size`) takes that many more."""
    if config.max_steps > 0:
        return
    if rows_per_step is None:
        rows_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    rows_per_step *= getattr(config, "world_size", 1)
    per_epoch = math.ceil(rows / max(rows_per_step, 1))
    config.max_steps = max(1, min(step_cap, math.ceil(per_epoch * config.num_train_epochs)))


def config_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-safe data for the manifest (scratch paths left out)."""
    data = config.to_dict()
    for key in ("output_dir", "logging_dir"):
        data.pop(key, None)
    return json_safe(data)


def json_safe(value: Any) -> Any:
    """Plain JSON data: non-finite floats become null, unknown objects their `str`."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _load_mapping(text: str, path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise JobError(f"config file {path} is not valid JSON: {_one_line(e)}") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise JobError(f"config file {path} is not valid YAML: {_one_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobError(f"config file {path} must hold a mapping of settings")
    return data


def _init_fields(config_cls: type) -> set[str]:
    return {f.name for f in fields(config_cls) if f.init}


def _lora_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in fields(LoraConfig) if f.init}


def _check_keys(owner: str, values: Mapping[str, Any], known: set[str], reserved: set[str]) -> None:
    prefix = LORA_PREFIX if owner == "LoraConfig" else ""
    for key in sorted(set(values) & reserved):
        raise JobError(f"config key {prefix + key!r} is set by the job itself")
    for key in sorted(set(values) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise JobError(f"unknown config key {prefix + key!r} for {owner}{hint}")


def _coerce(value: Any, hint: Any) -> Any:
    """YAML reads `1e-4` as a string: convert strings for numeric fields."""
    if not isinstance(value, str) or hint is None:
        return value
    types = typing.get_args(hint) or (hint,)
    if str in types:
        return value
    for kind in (int, float):
        if kind in types:
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
