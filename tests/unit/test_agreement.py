"""Rater agreement (Krippendorff's alpha, per-rater alpha, Cohen's kappa) and gold accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.feedback.agreement import (
    GoldScore,
    PairKappa,
    cohen_kappa,
    coincidences,
    gold_accuracy,
    krippendorff_alpha,
    rater_alpha,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the nominal example with
# missing values: observers A-D over units 1-12, "*" where an observer gave no value.
CANONICAL = {
    "A": "1 2 3 3 2 1 4 1 2 * * *",
    "B": "1 2 3 3 2 2 4 1 2 5 * 3",
    "C": "* 3 3 3 2 3 4 2 2 5 1 *",
    "D": "1 2 3 3 2 4 4 1 2 5 1 *",
}


def canonical_units() -> dict[int, dict[str, int]]:
    units: dict[int, dict[str, int]] = {}
    for rater, row in CANONICAL.items():
        for unit, value in enumerate(row.split(), start=1):
            if value != "*":
                units.setdefault(unit, {})[rater] = int(value)
    return units


def test_the_canonical_example_gives_the_papers_alpha() -> None:
    assert krippendorff_alpha(canonical_units()) == pytest.approx(0.743, abs=5e-4)


def test_the_canonical_coincidence_matrix_matches_the_paper() -> None:
    values, matrix = coincidences(canonical_units())
    assert values == [1, 2, 3, 4, 5]
    third = 1 / 3
    expected = [
        [7, 4 * third, third, third, 0],
        [4 * third, 10, 4 * third, third, 0],
        [third, 4 * third, 8, third, 0],
        [third, third, third, 4, 0],
        [0, 0, 0, 0, 3],
    ]
    np.testing.assert_allclose(matrix, expected)
    assert matrix.sum() == pytest.approx(40)  # unit 12 has one value: not pairable


def test_perfect_agreement_is_one() -> None:
    units = {u: {"x": u % 3, "y": u % 3, "z": u % 3} for u in range(10)}
    assert krippendorff_alpha(units) == pytest.approx(1.0)
    assert rater_alpha(units) == pytest.approx({"x": 1.0, "y": 1.0, "z": 1.0})
    assert all(pair.kappa == pytest.approx(1.0) for pair in cohen_kappa(units).values())


def test_alpha_is_undefined_without_pairs_or_without_variation() -> None:
    assert krippendorff_alpha({}) is None
    assert krippendorff_alpha({1: {"x": "a"}, 2: {"y": "b"}}) is None
    same = {u: {"x": "a", "y": "a"} for u in range(5)}
    assert krippendorff_alpha(same) is None
    assert rater_alpha(same) == {"x": None, "y": None}


def test_a_rater_without_pairable_values_has_no_alpha() -> None:
    units = {1: {"x": "a", "y": "a"}, 2: {"x": "b", "y": "b"}, 3: {"z": "a"}}
    assert rater_alpha(units) == {"x": pytest.approx(1.0), "y": pytest.approx(1.0), "z": None}


def test_kappa_of_the_textbook_yes_no_example() -> None:
    # 50 items: 20 yes-yes, 5 yes-no, 10 no-yes, 15 no-no. p_o = 0.7, p_e = 0.5, kappa = 0.4.
    pairs = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    units = {i: {"first": a, "second": b} for i, (a, b) in enumerate(pairs)}
    result = cohen_kappa(units)
    assert list(result) == [("first", "second")]
    assert result["first", "second"].common == 50
    assert result["first", "second"].kappa == pytest.approx(0.4)


def test_kappa_keys_are_sorted_and_min_common_filters() -> None:
    units = {1: {"zoe": "a", "al": "a", "bo": "a"}, 2: {"zoe": "b", "al": "b"}}
    result = cohen_kappa(units)
    assert set(result) == {("al", "zoe"), ("al", "bo"), ("bo", "zoe")}
    assert result["al", "zoe"] == PairKappa(kappa=1.0, common=2)
    assert result["al", "bo"] == PairKappa(kappa=None, common=1)  # one shared value: p_e = 1
    assert set(cohen_kappa(units, min_common=2)) == {("al", "zoe")}


def test_rater_alpha_singles_out_a_random_rater() -> None:
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 2, size=300)
    units: dict[int, dict[str, int]] = {}
    for unit, verdict in enumerate(truth):
        units[unit] = {name: int(verdict ^ (rng.random() < 0.1)) for name in ("ann", "bob", "cid")}
        units[unit]["rnd"] = int(rng.integers(0, 2))
    alphas = rater_alpha(units)
    # Careful raters: D_o = (2 * 0.18 + 0.5) / 3 against D_e = 0.5, alpha ~0.43; random: ~0.
    assert all(alphas[name] > 0.3 for name in ("ann", "bob", "cid"))
    assert alphas["rnd"] < 0.15
    assert min(alphas, key=alphas.__getitem__) == "rnd"
    overall = krippendorff_alpha(units)
    without = krippendorff_alpha(
        {u: {r: v for r, v in d.items() if r != "rnd"} for u, d in units.items()}
    )
    # Seeded; expected 1 - 0.34 / 0.5 = 0.32 with the random rater, 1 - 0.18 / 0.5 = 0.64 without.
    assert overall == pytest.approx(0.2860, abs=5e-4)
    assert without == pytest.approx(0.5960, abs=5e-4)


def test_gold_accuracy_counts_per_rater() -> None:
    answers = [("ann", "a", "a"), ("ann", "b", "a"), ("bob", "tie", "tie"), ("ann", "a", "a")]
    scores = gold_accuracy(answers)
    assert scores == {"ann": GoldScore(correct=2, total=3), "bob": GoldScore(correct=1, total=1)}
    assert scores["ann"].accuracy == pytest.approx(2 / 3)
    assert GoldScore(correct=0, total=0).accuracy is None
    assert gold_accuracy([]) == {}
