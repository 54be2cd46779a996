"""Checks on feedback that need no database: ranges, sizes, shapes.

`check_feedback` is the one place a feedback value's rules live: the HTTP routes' bodies carry
JSON types only, and the API, the rating tasks' routes, the UI, a gateway's forwarded records and
the store all refuse a value with its message.

Checks that need the database (do the responses exist, do they answer the same prompt) run in the
store's writer, inside the transaction that writes the row, so nothing is ever half-written.
"""

from __future__ import annotations

import re

from tuneloop.core.records import WINNERS, Comparison, Edit, Feedback, Ranking, Rating, Thumbs

MAX_TEXT_CHARS = 32_000
MAX_REASON_CHARS = 2_000
MAX_RANKING_SIZE = 16
MAX_ID = 2**63 - 1  # ids are BIGINT: a larger one is refused here, not by the writer
_RATER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


class FeedbackError(ValueError):
    """Feedback that cannot be recorded; the message says why."""


class UnknownResponseError(FeedbackError):
    """Feedback on a response (or conversation) that does not exist."""


class NotYoursError(FeedbackError):
    """Feedback on answers its rater may not judge (given to someone else)."""


def check_rater_id(rater_id: str) -> None:
    if not _RATER_ID.match(rater_id):
        raise FeedbackError(
            f"rater must be 1-64 characters of letters, digits and _ . @ : -, got {rater_id[:80]!r}"
        )


def check_feedback(fb: Feedback) -> None:
    """Raise FeedbackError with a message a person can act on, or return None."""
    check_rater_id(fb.rater_id)
    for rid in referenced_responses(fb):
        if isinstance(rid, bool) or not isinstance(rid, int) or not 1 <= rid <= MAX_ID:
            raise FeedbackError(f"a response id is an integer from 1 to {MAX_ID}, got {rid!r}")
    if isinstance(fb, Thumbs):
        if isinstance(fb.value, bool) or fb.value not in (1, -1):
            raise FeedbackError(f"thumbs value must be 1 or -1, got {fb.value!r}")
    elif isinstance(fb, Rating):
        if isinstance(fb.score, bool) or fb.score not in (1, 2, 3, 4, 5):
            raise FeedbackError(f"rating value must be an integer from 1 to 5, got {fb.score!r}")
        if fb.reason is not None and len(fb.reason) > MAX_REASON_CHARS:
            raise FeedbackError(
                f"rating reason is {len(fb.reason)} characters; the limit is {MAX_REASON_CHARS}"
            )
    elif isinstance(fb, Edit):
        # Blank counts as empty: an edit is the answer as it should read, and trains as one.
        if not isinstance(fb.text, str) or not fb.text.strip():
            raise FeedbackError("edit text is empty: an edit is the answer as it should read")
        if len(fb.text) > MAX_TEXT_CHARS:
            raise FeedbackError(
                f"edit text is {len(fb.text)} characters; the limit is {MAX_TEXT_CHARS}"
            )
    elif isinstance(fb, Comparison):
        if fb.winner not in WINNERS:
            raise FeedbackError(f"winner must be one of {', '.join(WINNERS)}, got {fb.winner!r}")
        if fb.response_a == fb.response_b:
            raise FeedbackError("a comparison needs two different responses")
    elif isinstance(fb, Ranking):
        k = len(fb.response_ids)
        if not 2 <= k <= MAX_RANKING_SIZE:
            raise FeedbackError(f"a ranking needs 2 to {MAX_RANKING_SIZE} responses, got {k}")
        if len(set(fb.response_ids)) != k:
            raise FeedbackError("a ranking lists each response once")
    else:
        raise FeedbackError(f"unknown feedback type {type(fb).__name__}")


def vote_item(fb: Feedback) -> str:
    """What a vote is about, as stored in the `item` column: one rater has one vote per item,
    and a repeat replaces it. An answer's id; for a comparison or a ranking, the ids of the
    answers it orders, sorted (the same two answers shown the other way round are one item)."""
    if isinstance(fb, Comparison):
        return ",".join(map(str, sorted((fb.response_a, fb.response_b))))
    if isinstance(fb, Ranking):
        return ",".join(map(str, sorted(fb.response_ids)))
    return str(fb.response_id)


def referenced_responses(fb: Feedback) -> tuple[int, ...]:
    if isinstance(fb, Comparison):
        return (fb.response_a, fb.response_b)
    if isinstance(fb, Ranking):
        return fb.response_ids
    return (fb.response_id,)
