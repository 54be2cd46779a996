"""Canaries in the database, and the human gate's verdict on one.

A canary is a candidate that passed the reward model's gate, answering a share of conversations
beside the served version (its `baseline`) while raters compare the two. Its verdict is the win
rate people give it over the baseline: every admitted human judgment between an answer of each
(comparisons, and the pairs rankings imply; ties and `both_bad` count half), with a 95 % normal
interval on the mean score. Once `min_judgments` are in, the canary is promoted if the interval's
lower end clears `min_win_rate`, else rejected. With 385 judgments the interval is about ±0.05
wide, so a true win rate of 55 % is told from 50 %.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import duckdb

from tuneloop.core.settings import GateSettings, TrustSettings
from tuneloop.feedback.leaderboard import version_battles
from tuneloop.feedback.store import FeedbackStore

Z_95 = 1.959964
CanaryStatus = Literal["running", "promoted", "rejected", "stopped"]


class CanaryError(ValueError):
    """A canary cannot start (one runs already) or is not running."""


@dataclass(frozen=True)
class Canary:
    id: int
    version_id: str
    baseline_id: str
    share: float
    min_judgments: int
    min_win_rate: float
    status: CanaryStatus
    result: dict[str, Any] | None
    started_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class HumanVerdict:
    judgments: int
    wins: float  # ties count half
    win_rate: float | None
    lower: float | None
    upper: float | None
    decision: Literal["promote", "reject"] | None  # None: too few judgments yet

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_canary(
    store: FeedbackStore, version_id: str, baseline_id: str, gate: GateSettings
) -> Canary:
    """Record that `version_id` answers `gate.canary_share` of conversations from now on."""

    def insert(con: duckdb.DuckDBPyConnection) -> int:
        running = con.execute("SELECT version_id FROM canaries WHERE status = 'running'").fetchall()
        if running:
            raise CanaryError(f"{running[0][0]} is in canary already: one at a time")
        (next_id,) = con.execute("SELECT coalesce(max(id), 0) + 1 FROM canaries").fetchone()
        con.execute(
            "INSERT INTO canaries VALUES (?, ?, ?, ?, ?, ?, 'running', NULL, ?, NULL)",
            [
                next_id,
                version_id,
                baseline_id,
                gate.canary_share,
                gate.human_judgments,
                gate.human_min_win_rate,
                datetime.now(UTC),
            ],
        )
        return next_id

    return _canary(store, store.write(insert))  # type: ignore[return-value]


def running_canary(store: FeedbackStore) -> Canary | None:
    rows = store.read("SELECT id FROM canaries WHERE status = 'running'")
    return _canary(store, rows[0]["id"]) if rows else None


def list_canaries(store: FeedbackStore) -> list[Canary]:
    ids = [r["id"] for r in store.read("SELECT id FROM canaries ORDER BY id DESC")]
    return [c for c in (_canary(store, i) for i in ids) if c is not None]


def finish_canary(
    store: FeedbackStore, canary_id: int, status: CanaryStatus, result: dict[str, Any]
) -> None:
    def update(con: duckdb.DuckDBPyConnection) -> None:
        changed = con.execute(
            "UPDATE canaries SET status = ?, result = ?, ended_at = ? "
            "WHERE id = ? AND status = 'running' RETURNING id",
            [status, json.dumps(result), datetime.now(UTC), canary_id],
        ).fetchall()
        if not changed:
            raise CanaryError(f"canary {canary_id} is not running")

    store.write(update)


def human_verdict(
    store: FeedbackStore, canary: Canary, trust: TrustSettings | None = None
) -> HumanVerdict:
    """What people say of the canary against its baseline so far (see the module's docstring)."""
    pair = (canary.version_id, canary.baseline_id)
    scores = [
        b.score_a if b.a == canary.version_id else 1.0 - b.score_a
        for b in version_battles(store, trust, pair)
    ]
    return verdict(scores, canary.min_judgments, canary.min_win_rate)


def verdict(scores: list[float], min_judgments: int, min_win_rate: float) -> HumanVerdict:
    """The verdict on a canary's scores against its baseline (1 win, 0.5 tie, 0 loss)."""
    n = len(scores)
    if n == 0:
        return HumanVerdict(0, 0.0, None, None, None, None)
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / max(1, n - 1)
    margin = Z_95 * math.sqrt(variance / n)
    lower, upper = max(0.0, mean - margin), min(1.0, mean + margin)
    decision = None
    if n >= min_judgments:
        decision = "promote" if lower > min_win_rate else "reject"
    return HumanVerdict(n, sum(scores), mean, lower, upper, decision)


def _canary(store: FeedbackStore, canary_id: int) -> Canary | None:
    rows = store.read("SELECT * FROM canaries WHERE id = ?", [canary_id])
    if not rows:
        return None
    r = rows[0]
    result = json.loads(r["result"]) if r["result"] else None
    return Canary(**(r | {"share": float(r["share"]), "result": result}))
