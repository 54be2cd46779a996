"""The arena over model versions: every human comparison between answers of two different
versions is a battle, and a Bradley-Terry fit with bootstrap intervals (`feedback.arena`) ranks
the versions. Rankings count as the comparisons they imply (each answer beats those ranked
below it); `both_bad` is a tie, as in Chatbot Arena. Only rows the trust policy admits count, so
a quarantined rater's votes leave the leaderboard as they leave the training data."""

from __future__ import annotations

from tuneloop.core.settings import TrustSettings
from tuneloop.feedback.arena import Battle, Standing, leaderboard
from tuneloop.feedback.store import FeedbackStore
from tuneloop.feedback.trust import admitted

DEFAULT_ROUNDS = 1000


def version_battles(
    store: FeedbackStore,
    trust: TrustSettings | None = None,
    versions: tuple[str, str] | None = None,
) -> list[Battle]:
    """Every admitted human judgment between two versions' answers, as (a, b, score of a);
    between `versions` only, if given (the human gate's canary and baseline)."""
    keep = admitted(trust or TrustSettings())
    pair = ""
    params: list[object] = []
    if versions is not None:
        pair = "AND ra.model_version_id IN (?, ?) AND rb.model_version_id IN (?, ?)"
        params = [*versions, *versions]
    rows = store.read(
        f"""
        WITH pairs AS (
            SELECT response_a AS a, response_b AS b,
                   CASE winner WHEN 'a' THEN 1.0 WHEN 'b' THEN 0.0 ELSE 0.5 END AS score
            FROM comparisons WHERE {keep}
            UNION ALL
            SELECT r.response_ids[i], r.response_ids[j], 1.0
            FROM rankings r,
                 range(1, len(r.response_ids) + 1) AS ti(i),
                 range(1, len(r.response_ids) + 1) AS tj(j)
            WHERE i < j AND {keep}
        )
        SELECT ra.model_version_id AS a, rb.model_version_id AS b, p.score
        FROM pairs p
        JOIN responses ra ON ra.id = p.a
        JOIN responses rb ON rb.id = p.b
        WHERE ra.model_version_id <> rb.model_version_id {pair}
        """,
        params,
    )
    return [Battle(r["a"], r["b"], float(r["score"])) for r in rows]


def version_leaderboard(
    store: FeedbackStore,
    trust: TrustSettings | None = None,
    *,
    rounds: int = DEFAULT_ROUNDS,
    seed: int = 0,
) -> list[Standing]:
    """The versions ranked by people, best first, with 95 % bootstrap intervals."""
    return leaderboard(version_battles(store, trust), rounds=rounds, seed=seed)
