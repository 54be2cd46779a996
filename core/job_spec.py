"""What a job process is told: one spec, written by the loop as a JSON file into the run's folder
and read back by the process. `JobSpec` for a training job (`python -m tuneloop.train.run
SPEC.json`), `GateSpec` for the gate (`python -m tuneloop.train.gate SPEC.json`). Tests and
benchmarks build one and run it in-process (`tuneloop.train.run.train_version`)."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Self

from tuneloop.core.files import write_json_atomic
from tuneloop.core.settings import GateSettings, JobSettings, SettingsError, check_job


class SpecFile:
    """JSON in and out for the spec dataclasses below: paths as strings, nested settings as
    objects; a file that does not fit the dataclass is a SettingsError naming what is wrong."""

    def write(self, path: Path) -> Path:
        return write_json_atomic(path, asdict(self), default=str)  # type: ignore[call-overload]

    @classmethod
    def read(cls, path: Path) -> Self:
        try:
            spec = _build(cls, json.loads(Path(path).read_text()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise SettingsError(f"{path} is not a {cls.__name__}: {exc}") from exc
        spec.check()
        return spec

    def check(self) -> None:
        """Raise SettingsError where fields that each parse do not fit together."""


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        elif value is not None and Path in typing.get_args(hint) + (hint,):
            value = Path(value)
        values[f.name] = value
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    return cls(**values)


@dataclass(frozen=True)
class JobSpec(SpecFile):
    """One training job: its kind, the datasets it reads, the model it starts from, the version
    dir it writes (`out`, built beside it and renamed into place) and the status file it keeps."""

    kind: str
    datasets: Path
    base: Path  # the root base model (full weights)
    out: Path
    version_id: str
    parent: Path | None = None  # a version dir to start from (an adapter); default: `base`
    parent_id: str | None = None
    snapshot_id: str | None = None
    status: Path | None = None
    settings: JobSettings = field(default_factory=JobSettings)
    reward_model: Path | None = None  # a reward version dir (the jobs that learn from one)

    def check(self) -> None:
        check_job(self.kind)


@dataclass(frozen=True)
class GateSpec(SpecFile):
    """One gate run: the candidate against the incumbent, answers scored by `reward_model`, on
    prompts from a file (`prompts`, one JSON list of messages a line) or from a datasets dir's
    held-out splits and MT-bench (`datasets`); the result JSON goes to `out`."""

    candidate: Path
    incumbent: Path
    reward_model: Path
    out: Path
    datasets: Path | None = None
    prompts: Path | None = None
    status: Path | None = None
    settings: GateSettings = field(default_factory=GateSettings)

    def check(self) -> None:
        if (self.datasets is None) == (self.prompts is None):
            raise SettingsError("a gate spec names prompts or datasets, one of them")
