"""Which policy job a cycle runs when the operator leaves it to the data (`--train-kind auto`),
and why.

People mostly give thumbs, sometimes regenerate or rate, rarely compare. Preference pairs (from
comparisons, rankings, regenerations, ratings, edits, and thumbs up and down on one prompt) are
the strongest signal, and with enough of them DPO learns from them alone. With fewer, the cycle's
reward model (trained on the pairs and on the thumbs, `train.reward_data`) generalises past them:
the `bon` job lets it pair the policy's own answers to the prompts the feedback is on, beside
the people's pairs (`train.scored_pairs`). On the demo model, a cycle fed by 1,000 simulated
conversations and 150 rater judgments won 0.72 and 0.63 (2 seeds) against the served policy
with DPO on the pairs alone, 0.95 with `bon` (mean of 3 seeds; bench/RESULTS.md). Where only
edits and well-rated answers are there, SFT. The reason goes on the candidate's metrics
(`job_choice`), so an operator sees why a version was trained the way it was.
"""

from __future__ import annotations

from collections.abc import Mapping

# Rows a job needs before it can learn anything worth gating.
MIN_ROWS = 16
# Pairs enough for DPO alone: clean comparisons took the demo model and SmolLM2 to 0.96-0.99
# against their parent from 300-600 (bench/RESULTS.md, `tuneloop simulate`).
ENOUGH_PAIRS = 400
# ... unless the thumbs outnumber them this many times over: then the reward model that learns
# from both has the more to say.
THUMBS_DOMINATE = 2


class NoJobError(ValueError):
    """The snapshot holds no rows any policy job learns from."""


def choose_policy_job(rows: Mapping[str, int]) -> tuple[str, str]:
    """The policy job for a snapshot whose datasets hold `rows` training rows (`preference`,
    `kto`, `sft`), and why, in words."""
    pairs, thumbs, sft = (int(rows.get(name, 0)) for name in ("preference", "kto", "sft"))
    counts = f"{pairs} preference pairs, {thumbs} KTO rows, {sft} SFT rows"
    if pairs >= ENOUGH_PAIRS and pairs * THUMBS_DOMINATE >= thumbs:
        return "dpo", f"dpo: the pairs suffice ({counts})"
    if pairs + thumbs >= MIN_ROWS:
        why = "thumbs dominate" if thumbs > pairs * THUMBS_DOMINATE else "few pairs"
        return "bon", (
            f"bon: {why}; the reward model learns from both and pairs the policy's answers "
            f"({counts})"
        )
    if sft >= MIN_ROWS:
        return "sft", f"sft: edits and well-rated answers are what there is ({counts})"
    for kind, n in (("bon", pairs + thumbs), ("sft", sft)):
        if n:
            return kind, f"{kind}: few rows of any kind, the most of them for {kind} ({counts})"
    raise NoJobError(f"no rows any policy job learns from ({counts})")
