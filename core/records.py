"""The records every part of tuneloop exchanges: plain frozen dataclasses, stdlib only.

`serve` and `train` never import each other; they meet through these records, the feedback store
and files on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
Winner = Literal["a", "b", "tie", "both_bad"]
VersionKind = Literal["policy", "reward"]
VersionStatus = Literal["candidate", "promoted", "rejected", "retired"]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
WINNERS: tuple[str, ...] = ("a", "b", "tie", "both_bad")
DEFAULT_RATER = "anonymous"

# What an account may do; each role may also do everything of the roles before it. `user` chats
# and judges its own answers; `rater` judges comparisons and rankings of anyone's prompts;
# `operator` trains, promotes, rolls back and imports; `admin` manages accounts.
AccountRole = Literal["user", "rater", "operator", "admin"]
ACCOUNT_ROLES: tuple[str, ...] = ("user", "rater", "operator", "admin")


def role_allows(role: str, needed: str) -> bool:
    """Whether `role` may do what `needed` may."""
    return ACCOUNT_ROLES.index(role) >= ACCOUNT_ROLES.index(needed)


@dataclass(frozen=True)
class Account:
    """Someone who may use tuneloop: the name their feedback rows carry, and their role. The
    token that signs them in is stored as its SHA-256 only."""

    name: str
    role: AccountRole
    disabled: bool = False
    created_at: datetime | None = None
    # A user an operator trusts: their edits may become training targets (raters' always may).
    trusted: bool = False


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


def messages_to_json(messages: tuple[Message, ...] | list[Message]) -> str:
    """Canonical JSON of a message list: the stored prompt and the input of `prompt_hash`."""
    return json.dumps(
        [{"role": m.role, "content": m.content} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def prompt_hash(messages: tuple[Message, ...] | list[Message]) -> str:
    """Stable hash of a prompt; groups answers to the same prompt and splits train/held-out."""
    return hashlib.sha256(messages_to_json(messages).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class Response:
    """One generated answer, as stored: what produced it and how."""

    id: int
    conversation_id: int
    prompt: tuple[Message, ...]
    text: str
    model_version_id: str
    params: SamplingParams
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: str = "stop"
    rater_id: str = DEFAULT_RATER


@dataclass(frozen=True)
class Thumbs:
    response_id: int
    value: Literal[1, -1]
    rater_id: str = DEFAULT_RATER


@dataclass(frozen=True)
class Rating:
    response_id: int
    score: int
    reason: str | None = None
    rater_id: str = DEFAULT_RATER


@dataclass(frozen=True)
class Edit:
    """A corrected answer for a response: the edit is preferred over the original."""

    response_id: int
    text: str
    rater_id: str = DEFAULT_RATER


@dataclass(frozen=True)
class Comparison:
    response_a: int
    response_b: int
    winner: Winner
    rater_id: str = DEFAULT_RATER
    # The rating task the queue handed this rater, when the vote came through it (never set
    # from a client's request): only such blind votes count for the human gate.
    task_id: int | None = None


@dataclass(frozen=True)
class Ranking:
    """k answers to the same prompt, best first."""

    response_ids: tuple[int, ...]
    rater_id: str = DEFAULT_RATER
    task_id: int | None = None  # as for `Comparison`


Feedback = Thumbs | Rating | Edit | Comparison | Ranking

FEEDBACK_KINDS: dict[type, str] = {
    Thumbs: "thumbs",
    Rating: "rating",
    Edit: "edit",
    Comparison: "comparison",
    Ranking: "ranking",
}


@dataclass(frozen=True)
class ModelVersion:
    id: str
    kind: VersionKind
    base: str
    artifact_path: str
    parent: str | None = None
    adapter: bool = False
    snapshot_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    status: VersionStatus = "candidate"
    created_at: datetime | None = None
    status_reason: str | None = None
    # Trained on rows of someone forgotten since (`tuneloop users forget`).
    trained_on_forgotten: bool = False


RunStatus = Literal["running", "done", "failed"]


@dataclass(frozen=True)
class TrainingRun:
    """One training job (or gate) as the Operator tab shows it; `progress` runs 0 to 1."""

    id: str
    kind: str
    status: RunStatus
    progress: float
    started_at: datetime
    stage: str | None = None
    snapshot_id: str | None = None
    version_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    trigger: str | None = None
    finished_at: datetime | None = None


def to_json_dict(record: Any) -> dict[str, Any]:
    """A record dataclass as a JSON-ready dict (datetimes as ISO strings, paths as strings), for
    the API and CLI."""
    return {k: _json_value(v) for k, v in asdict(record).items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if isinstance(value, Path) else value
