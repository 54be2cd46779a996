"""Which policy job a cycle runs when the operator leaves it to the data (`--train-kind auto`):
the one the snapshot holds enough rows for, preferring explicit preferences.

People mostly give thumbs, sometimes regenerate or rate, rarely compare. Preference pairs (from
comparisons, rankings, regenerations, ratings, edits, and thumbs up and down on one prompt) are
the stronger signal, so DPO runs whenever there are enough of them and they are not swamped by
thumbs that no pair holds; where thumbs dominate, KTO learns from each one alone; where only
edits and well-rated answers are there, SFT. The reason goes on the candidate's metrics
(`job_choice`), so an operator sees why a version was trained the way it was.
"""

from __future__ import annotations

from collections.abc import Mapping

# Rows a job needs before it can learn anything worth gating.
MIN_ROWS = 16
# Pairs suffice unless the thumbs outnumber them this many times over.
THUMBS_DOMINATE = 2


class NoJobError(ValueError):
    """The snapshot holds no rows any policy job learns from."""


def choose_policy_job(rows: Mapping[str, int]) -> tuple[str, str]:
    """The policy job for a snapshot whose datasets hold `rows` training rows (`preference`,
    `kto`, `sft`), and why, in words."""
    pairs, thumbs, sft = (int(rows.get(name, 0)) for name in ("preference", "kto", "sft"))
    counts = f"{pairs} preference pairs, {thumbs} KTO rows, {sft} SFT rows"
    if pairs >= MIN_ROWS and pairs * THUMBS_DOMINATE >= thumbs:
        return "dpo", f"dpo: the pairs suffice ({counts})"
    if thumbs >= MIN_ROWS:
        return "kto", f"kto: thumbs dominate ({counts})"
    if sft >= MIN_ROWS:
        return "sft", f"sft: edits and well-rated answers are what there is ({counts})"
    for kind, n in (("dpo", pairs), ("kto", thumbs), ("sft", sft)):
        if n:
            return kind, f"{kind}: few rows of any kind, the most of them for {kind} ({counts})"
    raise NoJobError(f"no rows any policy job learns from ({counts})")
