"""How much a rater's judgment of each open task would tell the reward model: the job behind the
rating queue's `active` selection (`tuneloop.loop.active`).

A task's answers are scored by the current reward model. Under its Bradley-Terry reading, one
answer beats another with probability sigmoid(r_a - r_b); a judgment of the pair tells the model
most where it is least sure, so a pair's information is the binary entropy of that probability
(in bits: 1 at a margin of 0, near 0 where the model is confident). A ranking's is the mean over
its pairs. Identical answers teach nothing and get 0. This is uncertainty sampling on the model's
own margin: the cheapest of the criteria in the active-RLHF literature (ensemble or dropout
disagreement needs several models or passes; a reward model trained with LoRA on a few hundred
pairs has no dropout to sample).

    python -m tuneloop.train.task_scores IN.json OUT.json

IN holds `reward_model` (a version dir), `device` (or null) and `tasks`: a list of `{"id",
"prompt": [messages], "answers": [texts]}`. OUT gets `{"scores": {id: {"info", "margin"}}}`,
where `margin` is the largest reward gap among the task's answers.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

from tuneloop.core.files import write_json_atomic


def pair_information(margin: float) -> float:
    """Bits a judgment of two answers `margin` apart in reward would tell: the binary entropy
    of sigmoid(margin)."""
    p = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin))))
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def task_information(texts: list[str], rewards: list[float]) -> tuple[float, float]:
    """(information, largest margin) of one task: the mean over its pairs of answers."""
    infos, margins = [], []
    for i, j in itertools.combinations(range(len(texts)), 2):
        margin = abs(rewards[i] - rewards[j])
        margins.append(margin)
        infos.append(0.0 if texts[i] == texts[j] else pair_information(margin))
    if not infos:
        return 0.0, 0.0
    return sum(infos) / len(infos), max(margins)


def score_tasks(
    reward_model: str | Path, tasks: list[dict[str, Any]], device: str | None = None
) -> dict[int, dict[str, float]]:
    """Information and margin of each task (see the module's docstring)."""
    from tuneloop.train.scoring import RewardScorer

    if not tasks:
        return {}
    scorer = RewardScorer(reward_model, device=device)
    prompts = [task["prompt"] for task in tasks for _ in task["answers"]]
    answers = [text for task in tasks for text in task["answers"]]
    rewards = scorer.score(prompts, answers)
    scores, at = {}, 0
    for task in tasks:
        n = len(task["answers"])
        info, margin = task_information(task["answers"], rewards[at : at + n])
        scores[int(task["id"])] = {"info": info, "margin": margin}
        at += n
    return scores


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tuneloop.train.task_scores IN.json OUT.json", file=sys.stderr)
        return 2
    given = json.loads(Path(args[0]).read_text())
    scores = score_tasks(given["reward_model"], given["tasks"], given.get("device"))
    write_json_atomic(Path(args[1]), {"scores": {str(k): v for k, v in scores.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
