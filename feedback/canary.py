"""Canaries in the database, and the human gate's verdict on one.

A canary is a candidate that passed the reward model's gate, answering a share of conversations
beside the served version (its `baseline`) while raters compare the two. Its verdict is the win
rate people give it over the baseline, with a 95 % normal interval on the mean score. Once
`min_judgments` count, the canary is promoted if the interval's lower end clears `min_win_rate`,
else rejected. With 385 judgments the interval is about ±0.05 wide, so a true win rate of 55 % is
told from 50 %.

What counts is narrow on purpose, since whoever moves the verdict decides what is served:
- only blind judgments: a vote given on a canary task the queue handed to its rater (the vote row
  names the task), never a vote posted directly on the same answers, and never by the person who
  asked the prompt;
- only by accounts with the rater role or above, enabled and not quarantined, read at every
  check: quarantining a rater takes their judgments out of a running canary's verdict at once;
- one judgment per vote: a ranking scores the canary by the mean over its pairs of a canary's
  and a baseline's answer (ties and `both_bad` count half);
- one rater's judgments count for at most `max_rater_share` of `min_judgments` (their first
  ones), so the gate waits until enough raters have judged.
A decided canary is not reopened when one of its raters is quarantined later; `flagged` names them
for the operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import duckdb

from tuneloop.core.settings import GateSettings, clears_bar
from tuneloop.feedback.store import FeedbackStore

Z_95 = 1.959964
# The roles whose blind judgments the human gate counts.
JUDGE_ROLES = ("rater", "operator", "admin")
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
    max_rater_share: float = 0.25

    @property
    def per_rater(self) -> int:
        """The most judgments of one rater that count."""
        return max(1, math.floor(self.max_rater_share * self.min_judgments))


@dataclass(frozen=True)
class HumanVerdict:
    judgments: int
    wins: float  # ties count half
    win_rate: float | None
    lower: float | None
    upper: float | None
    decision: Literal["promote", "reject"] | None  # None: too few judgments yet
    # Judgments counted per rater, and those left out over one rater's share.
    by_rater: dict[str, int] = field(default_factory=dict)
    over_share: int = 0

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
            "INSERT INTO canaries (id, version_id, baseline_id, share, min_judgments, "
            "min_win_rate, status, started_at, max_rater_share) "
            "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            [
                next_id,
                version_id,
                baseline_id,
                gate.canary_share,
                gate.human_judgments,
                gate.human_min_win_rate,
                datetime.now(UTC),
                gate.human_max_rater_share,
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


def human_verdict(store: FeedbackStore, canary: Canary) -> HumanVerdict:
    """What raters say of the canary against its baseline so far (see the module's docstring)."""
    rows = store.read(
        _BLIND_JUDGMENTS,
        {"canary": canary.version_id, "baseline": canary.baseline_id},
    )
    counted = [r for r in rows if r["nth"] <= canary.per_rater]
    by_rater: dict[str, int] = {}
    for r in counted:
        by_rater[r["rater_id"]] = by_rater.get(r["rater_id"], 0) + 1
    found = verdict([float(r["score"]) for r in counted], canary.min_judgments, canary.min_win_rate)
    return replace(found, by_rater=by_rater, over_share=len(rows) - len(counted))


# Each blind judgment on a canary task between the canary's and the baseline's answers: the
# canary's mean score over the vote's pairs of one answer of each, and the rater's count so far.
_BLIND_JUDGMENTS = f"""
WITH votes AS (
    SELECT id, 'comparison' AS kind, rater_id, task_id, response_a AS a, response_b AS b,
           CASE winner WHEN 'a' THEN 1.0 WHEN 'b' THEN 0.0 ELSE 0.5 END AS score
    FROM comparisons WHERE task_id IS NOT NULL
    UNION ALL
    SELECT r.id, 'ranking', r.rater_id, r.task_id, r.response_ids[i], r.response_ids[j], 1.0
    FROM rankings r,
         range(1, len(r.response_ids) + 1) AS ti(i),
         range(1, len(r.response_ids) + 1) AS tj(j)
    WHERE r.task_id IS NOT NULL AND i < j
),
judgments AS (
    SELECT v.kind, v.id, v.rater_id,
           avg(CASE WHEN ra.model_version_id = $canary THEN v.score ELSE 1.0 - v.score END)
               AS score
    FROM votes v
    JOIN tasks t ON t.id = v.task_id AND t.source = 'canary'
    JOIN responses ra ON ra.id = v.a
    JOIN responses rb ON rb.id = v.b
    JOIN accounts acc ON acc.name = v.rater_id
    WHERE v.rater_id IS DISTINCT FROM t.author
      AND acc.role IN ({", ".join(repr(r) for r in JUDGE_ROLES)}) AND NOT acc.disabled
      AND v.rater_id NOT IN (SELECT rater_id FROM quarantine)
      AND ((ra.model_version_id = $canary AND rb.model_version_id = $baseline)
           OR (ra.model_version_id = $baseline AND rb.model_version_id = $canary))
    GROUP BY v.kind, v.id, v.rater_id
)
SELECT rater_id, score,
       row_number() OVER (PARTITION BY rater_id ORDER BY kind, id) AS nth
FROM judgments
ORDER BY kind, id
"""


def flagged_raters(store: FeedbackStore, canary: Canary) -> list[str]:
    """Raters whose judgments decided `canary` and who are quarantined or disabled since: the
    decision stands, but an operator should look again."""
    counted = (canary.result or {}).get("by_rater") or {}
    if canary.status not in ("promoted", "rejected") or not counted:
        return []
    rows = store.read(
        "SELECT rater_id FROM quarantine WHERE rater_id IN (SELECT unnest($names)) "
        "UNION SELECT name FROM accounts WHERE disabled AND name IN (SELECT unnest($names))",
        {"names": sorted(counted)},
    )
    return sorted(r["rater_id"] for r in rows)


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
        decision = "promote" if clears_bar(lower, min_win_rate) else "reject"
    return HumanVerdict(n, sum(scores), mean, lower, upper, decision)


def _canary(store: FeedbackStore, canary_id: int) -> Canary | None:
    rows = store.read("SELECT * FROM canaries WHERE id = ?", [canary_id])
    if not rows:
        return None
    r = rows[0]
    result = json.loads(r["result"]) if r["result"] else None
    share = r["max_rater_share"]
    return Canary(
        **(
            r
            | {
                "share": float(r["share"]),
                "result": result,
                "max_rater_share": 0.25 if share is None else float(share),
            }
        )
    )
