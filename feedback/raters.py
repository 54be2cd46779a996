"""How good each rater's judgments are, and quarantine for those who judge badly.

Agreement is read from the store: every comparison or ranking item judged by two raters or more
is a unit, and each rater's value on it is the answer they put first (a comparison's winner,
or `tie` / `both_bad`; a ranking's best), named by its place among the item's answers. From
those: Krippendorff's alpha over everyone and per rater, Cohen's kappa per pair, and accuracy
on gold tasks (`feedback.tasks`). Quarantined
raters' rows leave every later snapshot (`feedback.trust`) until they are reinstated; their
votes still count here, so that an operator sees whether they improved.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from tuneloop.feedback.accounts import write_audit
from tuneloop.feedback.agreement import cohen_kappa, gold_accuracy, krippendorff_alpha, rater_alpha
from tuneloop.feedback.store import FeedbackStore

# Pairs of raters with fewer items in common get no kappa: it would say nothing.
MIN_COMMON_FOR_KAPPA = 5

# Each vote's first choice, by item, as the answer's place among the item's answers sorted by
# id ('1', '2', ...; or 'tie', 'both_bad'): the same few values on every item, as agreement
# needs (an answer's id, unique to its item, would make any two raters look alike by chance
# never, and a random rater look good). Comparisons store the answers in the order shown.
_VOTES = """
    SELECT 'comparison' AS kind, item, rater_id,
           CASE WHEN winner IN ('tie', 'both_bad') THEN winner
                WHEN (winner = 'a') = (response_a < response_b) THEN '1' ELSE '2' END AS value
    FROM comparisons
    UNION ALL
    SELECT 'ranking', item, rater_id,
           list_position(list_sort(response_ids), response_ids[1])::VARCHAR
    FROM rankings
"""


@dataclass(frozen=True)
class RaterQuality:
    name: str
    judgments: int  # votes on items someone else judged too
    alpha: float | None  # agreement with the others (Krippendorff's, this rater's pairs)
    gold_correct: int
    gold_total: int
    quarantined: bool

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_total if self.gold_total else None


@dataclass(frozen=True)
class PairAgreement:
    a: str
    b: str
    kappa: float | None
    common: int


@dataclass(frozen=True)
class RaterReport:
    alpha: float | None  # over every rater
    raters: list[RaterQuality]
    pairs: list[PairAgreement]


def shared_units(store: FeedbackStore) -> dict[str, dict[str, str]]:
    """Item -> {rater: value} for the items two raters or more judged."""
    rows = store.read(
        f"""
        WITH v AS ({_VOTES})
        SELECT kind || ':' || item AS unit, rater_id, value FROM v
        WHERE (kind, item) IN (
            SELECT (kind, item) FROM v GROUP BY kind, item HAVING count(*) > 1
        )
        """
    )
    units: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        units[r["unit"]][r["rater_id"]] = r["value"]
    return dict(units)


def gold_answers(store: FeedbackStore) -> list[tuple[str, str, str]]:
    """(rater, value given, gold value) for every vote on a gold task."""
    rows = store.read(
        f"""
        WITH v AS ({_VOTES})
        SELECT v.rater_id, v.value,
               list_position(list_sort(t.response_ids), t.gold_response_id)::VARCHAR AS gold
        FROM tasks t JOIN v ON v.kind = t.kind AND v.item = t.item
        WHERE t.gold_response_id IS NOT NULL AND v.rater_id IS DISTINCT FROM t.author
        """
    )
    return [(r["rater_id"], r["value"], r["gold"]) for r in rows]


def quarantined(store: FeedbackStore) -> list[dict[str, Any]]:
    return store.read("SELECT * FROM quarantine ORDER BY created_at")


def rater_report(store: FeedbackStore) -> RaterReport:
    units = shared_units(store)
    per_rater = rater_alpha(units)
    judged: dict[str, int] = defaultdict(int)
    for values in units.values():
        for rater in values:
            judged[rater] += 1
    gold = gold_accuracy(gold_answers(store))
    held = {r["rater_id"] for r in quarantined(store)}
    names = sorted(set(judged) | set(gold) | held)
    raters = [
        RaterQuality(
            name,
            judged.get(name, 0),
            per_rater.get(name),
            gold[name].correct if name in gold else 0,
            gold[name].total if name in gold else 0,
            name in held,
        )
        for name in names
    ]
    pairs = [
        PairAgreement(a, b, pk.kappa, pk.common)
        for (a, b), pk in sorted(cohen_kappa(units, MIN_COMMON_FOR_KAPPA).items())
    ]
    return RaterReport(krippendorff_alpha(units), raters, pairs)


def below(
    report: RaterReport,
    *,
    alpha: float | None = None,
    gold_accuracy: float | None = None,
    min_judgments: int = 20,
) -> list[str]:
    """Raters not yet quarantined whose agreement (over at least `min_judgments` shared items)
    is under `alpha`, or whose gold accuracy (over at least a tenth as many gold votes: gold
    tasks are a small share of what raters see) is under `gold_accuracy`."""
    found = []
    for r in report.raters:
        if r.quarantined:
            continue
        low_alpha = (
            alpha is not None
            and r.alpha is not None
            and r.judgments >= min_judgments
            and r.alpha < alpha
        )
        low_gold = (
            gold_accuracy is not None
            and r.gold_accuracy is not None
            and r.gold_total >= max(1, min_judgments // 10)
            and r.gold_accuracy < gold_accuracy
        )
        if low_alpha or low_gold:
            found.append(r.name)
    return found


def quarantine(store: FeedbackStore, names: list[str], reason: str, *, actor: str) -> list[str]:
    """Quarantine raters (those already held stay as they were); returns those newly held."""

    def insert(con: duckdb.DuckDBPyConnection) -> list[str]:
        held = [
            name
            for (name,) in con.execute(
                "INSERT INTO quarantine SELECT unnest(?::VARCHAR[]), ?, ?, ? "
                "ON CONFLICT DO NOTHING RETURNING rater_id",
                [names, reason, actor, datetime.now(UTC)],
            ).fetchall()
        ]
        for name in held:
            write_audit(con, actor, "rater.quarantine", name, {"reason": reason})
        return sorted(held)

    return store.write(insert) if names else []


def reinstate(store: FeedbackStore, name: str, *, actor: str) -> bool:
    """Let a quarantined rater's rows train again; whether they were held."""

    def delete(con: duckdb.DuckDBPyConnection) -> bool:
        gone = con.execute(
            "DELETE FROM quarantine WHERE rater_id = ? RETURNING rater_id", [name]
        ).fetchall()
        if gone:
            write_audit(con, actor, "rater.reinstate", name, {})
        return bool(gone)

    return store.write(delete)
