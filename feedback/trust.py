"""The trust policy in SQL: which feedback rows a snapshot keeps and the scheduler counts
(`tuneloop.core.settings.TrustSettings`). Rows are judged by their rater against the accounts
table at the moment of the snapshot, so disabling an account, or quarantining a rater
(`feedback.raters`), takes its rows out of every later snapshot."""

from __future__ import annotations

from tuneloop.core.settings import TrustSettings
from tuneloop.feedback.store import FEEDBACK_TABLES, FeedbackStore

# Raters that are tuneloop itself acting for an operator (`tuneloop data import`).
TRUSTED_SOURCES = ("import",)


def admitted(trust: TrustSettings, column: str = "rater_id") -> str:
    """A SQL condition on `column`, true for the rows `trust` lets train a model."""
    sources = ", ".join(f"'{name}'" for name in TRUSTED_SOURCES)
    parts = [
        f"{column} IN (SELECT name FROM accounts WHERE NOT disabled)",
        f"{column} IN ({sources})",
    ]
    if trust.anonymous:
        parts.append(f"{column} NOT IN (SELECT name FROM accounts)")
    quarantined = f"{column} NOT IN (SELECT rater_id FROM quarantine)"
    return "((" + " OR ".join(parts) + f") AND {quarantined})"


def admitted_since(
    store: FeedbackStore, max_ids: dict[str, int | None], trust: TrustSettings
) -> int:
    """Feedback rows `trust` admits with an id past `max_ids[table]` (all, where None)."""
    parts = [
        f"SELECT count(*) FROM {table} WHERE {admitted(trust)} AND id > {int(top or 0)}"
        for table in FEEDBACK_TABLES.values()
        for top in [max_ids.get(table)]
    ]
    with store.cursor() as cur:
        return sum(n for (n,) in cur.execute(" UNION ALL ".join(parts)).fetchall())
