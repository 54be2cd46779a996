"""What the reward model learns from: preference pairs, and thumbs paired across prompts."""

from __future__ import annotations

import json
from typing import Any

import datasets

from tuneloop.train.reward_data import (
    CROSS_PROMPT_WEIGHT,
    PARTNERS,
    SOURCE,
    reward_rows,
    unpaired_thumbs,
)


def msg(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def thumbs(verdicts: list[tuple[str, bool]]) -> datasets.Dataset:
    """KTO rows, one per (prompt text, liked); each answer's text is unique."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [msg("user", prompt) for prompt, _ in verdicts],
            "completion": [msg("assistant", f"answer {i}") for i in range(len(verdicts))],
            "label": [liked for _, liked in verdicts],
        }
    )


def both_verdicts(prompts: int) -> datasets.Dataset:
    """A liked and a disliked answer on each prompt: every same-prompt partner is on offer."""
    return thumbs([(f"q{i}", liked) for i in range(prompts) for liked in (True, False)])


def key(row: dict[str, Any]) -> str:
    return json.dumps([row["prompt"], row["completion"]])


def test_thumbs_pair_across_prompts_with_the_liked_answer_chosen() -> None:
    pairs = unpaired_thumbs(both_verdicts(12), seed=0)
    # Each of the 24 rows draws up to `PARTNERS`; every one of them found one.
    assert 12 <= len(pairs) <= 2 * 12 * PARTNERS
    assert len({key(up) for up, _ in pairs}) == 12 == len({key(down) for _, down in pairs})
    for up, down in pairs:
        assert up["label"] and not down["label"]
        assert up["prompt"] != down["prompt"]


def test_every_thumb_gets_a_few_partners_not_all_of_them() -> None:
    """With every prompt distinct no draw is refused, so each row is paired; each row draws
    `PARTNERS`, so the count grows with the rows, not with their product."""
    rows = thumbs([(f"q{i}", i % 2 == 0) for i in range(40)])
    pairs = unpaired_thumbs(rows, seed=0)
    assert len(pairs) == len(set((key(up), key(down)) for up, down in pairs))  # each pair once
    assert len(pairs) <= PARTNERS * len(rows) < 20 * 20
    paired = {key(row) for pair in pairs for row in pair}
    assert paired == {key(row) for row in rows}


def test_one_verdict_against_many_is_partnered_by_each_of_them() -> None:
    rows = thumbs([("q0", True)] + [(f"q{i}", False) for i in range(1, 9)])
    pairs = unpaired_thumbs(rows, seed=0)
    assert sorted(key(down) for _, down in pairs) == sorted(key(r) for r in rows if not r["label"])


def test_pairing_is_seeded() -> None:
    rows = both_verdicts(12)
    assert unpaired_thumbs(rows, seed=0) == unpaired_thumbs(rows, seed=0)
    assert unpaired_thumbs(rows, seed=0) != unpaired_thumbs(rows, seed=1)


def test_no_cross_pairs_without_both_verdicts_on_other_prompts() -> None:
    assert unpaired_thumbs(thumbs([(f"q{i}", True) for i in range(6)]), seed=0) == []
    assert unpaired_thumbs(thumbs([(f"q{i}", False) for i in range(6)]), seed=0) == []
    assert unpaired_thumbs(thumbs([("q", True), ("q", False), ("q", True)]), seed=0) == []


def preference(n: int, **extra: list[Any]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt": [msg("user", f"p{i}") for i in range(n)],
            "chosen": [msg("assistant", f"good {i}") for i in range(n)],
            "rejected": [msg("assistant", f"bad {i}") for i in range(n)],
            **extra,
        }
    )


def test_reward_rows_are_the_pairs_then_the_cross_pairs_as_whole_conversations() -> None:
    kto = both_verdicts(6)
    rows = reward_rows(preference(2, source=["comparison", "thumbs"]), kto, seed=3)
    cross = unpaired_thumbs(kto, seed=3)
    assert cross and len(rows) == 2 + len(cross)
    assert rows[0] == {
        "chosen": msg("user", "p0") + msg("assistant", "good 0"),
        "rejected": msg("user", "p0") + msg("assistant", "bad 0"),
        "source": "comparison",
        "weight": 1.0,
    }
    assert rows["source"][:2] == ["comparison", "thumbs"] and rows["weight"][:2] == [1.0, 1.0]
    assert rows.select(range(2, len(rows))).to_list() == [
        {
            "chosen": up["prompt"] + up["completion"],
            "rejected": down["prompt"] + down["completion"],
            "source": SOURCE,
            "weight": CROSS_PROMPT_WEIGHT,
        }
        for up, down in cross
    ]


def test_reward_rows_keep_the_pairs_weights() -> None:
    no_thumbs = thumbs([])
    weighted = reward_rows(preference(2, weight=[0.25, 0.75]), no_thumbs, seed=0)
    assert weighted["weight"] == [0.25, 0.75]
    assert weighted["source"] == ["preference", "preference"]  # no source column
