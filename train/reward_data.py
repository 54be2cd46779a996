"""What the reward model learns from: the preference pairs, and thumbs that no pair holds.

Most of a deployment's feedback is thumbs, on prompts asked once: an answer liked and an answer
disliked on the same prompt (the preference dataset's `thumbs` pairs) are rare. But a reward model
scores an answer on its own, so a thumb says something about it without a sibling: an answer
someone liked should, more often than not, score above an answer someone disliked, whatever the
two prompts were. Each thumb is therefore paired with `PARTNERS` thumbs of the other verdict on
other answers (drawn by a seed), the liked one as chosen. This is the Bradley-Terry reading of
unpaired binary feedback; the KTO paper makes the same point from the policy's side.

Such a pair is weaker evidence than two answers to one prompt compared by one person: two people's
bars differ, and so do two prompts' difficulty. It weighs `CROSS_PROMPT_WEIGHT`, as a rater right
three times in four would (w = 2p - 1, `feedback.raters`), under the trust-weighted loss of
`train.weighted`.

All rows are conversations with the prompt inside (TRL's implicit-prompt format): cross-prompt
pairs have no single prompt, and TRL joins an explicit prompt to each side the same way anyway.
"""

from __future__ import annotations

import random
from typing import Any

import datasets

from tuneloop.train.weighted import WEIGHT

PARTNERS = 2
DRAWS = 4  # tries to find a partner on another prompt
CROSS_PROMPT_WEIGHT = 0.5
SOURCE = "thumbs_unpaired"


def reward_rows(
    pairs: datasets.Dataset, thumbs: datasets.Dataset, *, seed: int
) -> datasets.Dataset:
    """The preference `pairs` and the cross-prompt pairs of the KTO rows `thumbs` (`prompt`,
    `completion`, `label`), as `chosen`, `rejected` (whole conversations), `source`, `weight`."""
    rows: dict[str, list[Any]] = {"chosen": [], "rejected": [], "source": [], WEIGHT: []}
    columns = set(pairs.column_names)
    for row in pairs:
        rows["chosen"].append(row["prompt"] + row["chosen"])
        rows["rejected"].append(row["prompt"] + row["rejected"])
        rows["source"].append(row["source"] if "source" in columns else "preference")
        rows[WEIGHT].append(row[WEIGHT] if WEIGHT in columns else 1.0)
    for up, down in unpaired_thumbs(thumbs, seed=seed):
        rows["chosen"].append(up["prompt"] + up["completion"])
        rows["rejected"].append(down["prompt"] + down["completion"])
        rows["source"].append(SOURCE)
        rows[WEIGHT].append(CROSS_PROMPT_WEIGHT)
    return datasets.Dataset.from_dict(rows)


def unpaired_thumbs(
    thumbs: datasets.Dataset, *, seed: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(liked, disliked) rows: every row with up to `PARTNERS` rows of the other verdict drawn
    at random (a draw on the row's own prompt is drawn again, a few times at most), each pair
    once."""
    ups = [row for row in thumbs if row["label"]]
    downs = [row for row in thumbs if not row["label"]]
    rng = random.Random(seed)
    chosen: set[tuple[int, int]] = set()
    for mine, theirs, up_first in ((ups, downs, True), (downs, ups, False)):
        for i, row in enumerate(mine):
            for _ in range(PARTNERS if theirs else 0):
                for _draw in range(DRAWS):
                    j = rng.randrange(len(theirs))
                    if theirs[j]["prompt"] != row["prompt"]:
                        chosen.add((i, j) if up_first else (j, i))
                        break
    return [(ups[i], downs[j]) for i, j in sorted(chosen)]
