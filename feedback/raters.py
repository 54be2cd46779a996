"""How good each rater's judgments are, and quarantine for those who judge badly.

Agreement is read from the store: every comparison or ranking item judged by two raters or more
is a unit, and each rater's value on it is the answer they put first (a comparison's winner,
or `tie` / `both_bad`; a ranking's best), named by its place among the item's answers. From
those: Krippendorff's alpha over everyone and per rater, Cohen's kappa per pair, and accuracy
on gold tasks (`feedback.tasks`). Quarantined
raters' rows leave every later snapshot (`feedback.trust`) until they are reinstated; their
votes still count here, so that an operator sees whether they improved.

Trust weights (`rater_weights`) turn the same evidence into one number per rater, which weighs
their judgments in training (the snapshot's accounts carry it to `feedback.datasets`);
`apply_trust`, run by the training cycle before each snapshot, also quarantines the raters whose
weight falls below 0.5.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from tuneloop.core.settings import TrustSettings
from tuneloop.feedback.accounts import write_audit
from tuneloop.feedback.agreement import (
    cohen_kappa,
    gold_accuracy,
    krippendorff_alpha,
    rater_alpha,
    reliability,
)
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.trust import TRUSTED_SOURCES

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


# --- Trust weights --------------------------------------------------------------------------------

# A rater without evidence weighs this much: right 4 times in 5 (p = 0.8, a little below what
# InstructGPT's 73-77 % agreement between labelers implies), above the quarantine line, below an
# honest rater who has shown it. The prior counts as this many votes.
PRIOR_WEIGHT = 0.6
PRIOR_VOTES = 10.0
# Below this weight, with at least this many votes (shared judgments and gold), a rater is
# quarantined: p < 0.75, closer to a coin than to an honest rater.
QUARANTINE_BELOW = 0.5
MIN_VOTES_TO_QUARANTINE = 15
# ... and only when the weight is below it at the optimistic end too: the reliability this many
# standard errors above its estimate (one-sided 95 %). A weight from 15 votes is noisy: with the
# rating desk weighing raters every 10 judgments, the point estimate alone quarantined 1 honest
# rater in 6 (right 9 times in 10) before their votes could show it (bench/RESULTS.md); an
# inverted rater (reliability -1) is held as soon, and one voting at random after about 20 votes.
QUARANTINE_Z = 1.64
# Roles whose judgments are weighed: those that take rating tasks. A user judging their own
# answers is capped by share instead (`TrustSettings.max_user_share`), the operator's imports
# are trusted: both weigh 1.
WEIGHED_ROLES = ("rater", "operator", "admin")


@dataclass(frozen=True)
class RaterWeight:
    name: str
    weight: float  # in [0, 1]: 1 fully trusted, 0 no say
    optimistic: float  # the weight with the reliability QUARANTINE_Z standard errors higher
    fitted: float | None  # 2p - 1 from agreement and gold alone (`agreement.reliability`)
    evidence: float  # votes' worth behind `fitted`
    votes: int  # judgments of shared items, and gold votes
    gold_correct: int
    gold_total: int

    def reason(self) -> str:
        """Why the weight is what it is, for the quarantine's reason and the audit log."""
        fitted = "none" if self.fitted is None else f"{self.fitted:.2f}"
        return (
            f"trust weight {self.weight:.2f} < {QUARANTINE_BELOW} (at best {self.optimistic:.2f}): "
            f"reliability {fitted} from "
            f"agreement over {self.votes - self.gold_total} shared judgments and gold "
            f"{self.gold_correct}/{self.gold_total} ({self.evidence:.1f} votes' worth), "
            f"prior {PRIOR_WEIGHT} as {PRIOR_VOTES:g} votes"
        )


@dataclass(frozen=True)
class TrustUpdate:
    weights: dict[str, RaterWeight]  # every weighed rater, quarantined or not
    quarantined: list[str]  # held by this update


def rater_weights(store: FeedbackStore) -> dict[str, RaterWeight]:
    """The trust weight of every rater (accounts of `WEIGHED_ROLES`, and voters on shared items
    that are no account), from their agreement with the others and their gold answers.

    The weight is w = 2p - 1 clipped to [0, 1], p the chance the rater's verdict is right: 1 for
    one always right, 0 for a coin flip, and 0 too for one who is more often wrong (an inverted
    rater's votes would teach the opposite). The same w is the label smoothing's confidence in a
    rater (p = (1 + w) / 2), and it is what `agreement.reliability` estimates. That estimate is
    shrunk toward PRIOR_WEIGHT, counted as PRIOR_VOTES votes: w = (PRIOR_VOTES * PRIOR_WEIGHT +
    evidence * fitted) / (PRIOR_VOTES + evidence), so a new rater starts at 0.6, three votes move
    them little, and fifty decide (a random rater is then near 0.1, an honest one right 9 times in
    10 near 0.75).
    """
    units = shared_units(store)
    answers = gold_answers(store)
    fitted = reliability(units, answers)
    judged: dict[str, int] = defaultdict(int)
    for values in units.values():
        for rater in values:
            judged[rater] += 1
    gold = gold_accuracy(answers)
    roles = {r["name"]: r["role"] for r in store.read("SELECT name, role FROM accounts")}
    names = {name for name, role in roles.items() if role in WEIGHED_ROLES}
    names |= {name for name in set(judged) | set(gold) if name not in roles}
    names -= set(TRUSTED_SOURCES)
    weights = {}
    for name in sorted(names):
        fit = fitted.get(name)
        evidence = fit.evidence if fit else 0.0
        value = fit.value if fit else 0.0
        score = gold.get(name)
        weights[name] = RaterWeight(
            name,
            _shrunk(value, evidence),
            _shrunk(value + QUARANTINE_Z * _standard_error(value, evidence), evidence),
            fit.value if fit else None,
            evidence,
            judged.get(name, 0) + (score.total if score else 0),
            score.correct if score else 0,
            score.total if score else 0,
        )
    return weights


def _shrunk(reliability: float, evidence: float) -> float:
    """The reliability pulled toward PRIOR_WEIGHT as PRIOR_VOTES votes, clipped to [0, 1]."""
    shrunk = (PRIOR_VOTES * PRIOR_WEIGHT + evidence * reliability) / (PRIOR_VOTES + evidence)
    return min(1.0, max(0.0, shrunk))


def _standard_error(reliability: float, evidence: float) -> float:
    """Of r = 2p - 1 estimated from `evidence` votes: 2 sqrt(p (1 - p) / n) = sqrt((1 - r^2) / n),
    no less than 1 / n (at r = +-1 the formula says 0, which n votes cannot)."""
    if evidence <= 0:
        return 0.0
    return math.sqrt(max(1 - reliability**2, 1 / evidence) / evidence)


def apply_trust(store: FeedbackStore, settings: TrustSettings) -> TrustUpdate:
    """Weigh every rater and quarantine (as "tuneloop", each with their weight's reason) those
    not yet held whose weight is under QUARANTINE_BELOW even at the optimistic end
    (QUARANTINE_Z), over at least MIN_VOTES_TO_QUARANTINE votes. Run before each snapshot and
    by the rating desk as judgments come in; with `settings.rater_weights` off it quarantines no
    one (the unweighted loop), and the weights are only reported."""
    weights = rater_weights(store)
    if not settings.rater_weights:
        return TrustUpdate(weights, [])
    held = {r["rater_id"] for r in quarantined(store)}
    newly = []
    for w in weights.values():
        low = w.optimistic < QUARANTINE_BELOW and w.votes >= MIN_VOTES_TO_QUARANTINE
        if low and w.name not in held:
            newly += quarantine(store, [w.name], w.reason(), actor="tuneloop")
    return TrustUpdate(weights, newly)
