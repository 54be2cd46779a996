"""Bradley-Terry ratings and the bootstrap leaderboard of `tuneloop.feedback.arena`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneloop.feedback.arena import Battle, bradley_terry, leaderboard

THREE_TO_ONE = 400 * math.log10(3)  # 190.85: the gap at which P(win) = 0.75


def simulated(truth: dict[str, float], n: int, seed: int) -> list[Battle]:
    """`n` battles between random pairs of versions, won as Bradley-Terry with `truth` says."""
    rng = np.random.default_rng(seed)
    names = sorted(truth)
    battles = []
    for _ in range(n):
        a, b = rng.choice(names, size=2, replace=False)
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        battles.append(Battle(str(a), str(b), float(rng.random() < p)))
    return battles


def test_three_wins_in_four_give_the_three_to_one_gap() -> None:
    ratings = bradley_terry([Battle("A", "B", 1)] * 3 + [Battle("A", "B", 0)])
    assert ratings["A"] - ratings["B"] == pytest.approx(THREE_TO_ONE, abs=0.5)
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000)


def test_a_tie_counts_half_a_win() -> None:
    ratings = bradley_terry([Battle("A", "B", 1), Battle("A", "B", 0.5)])
    assert ratings["A"] - ratings["B"] == pytest.approx(THREE_TO_ONE, abs=0.5)


def test_a_consistent_order_is_recovered() -> None:
    battles = (
        [Battle("A", "B", 1)] * 7
        + [Battle("A", "B", 0)] * 3
        + [Battle("B", "C", 1)] * 7
        + [Battle("B", "C", 0)] * 3
        + [Battle("A", "C", 1)] * 8
        + [Battle("A", "C", 0)] * 2
    )
    ratings = bradley_terry(battles)
    assert sorted(ratings, key=ratings.__getitem__, reverse=True) == ["A", "B", "C"]
    assert sum(ratings.values()) / 3 == pytest.approx(1000)
    assert [s.version for s in leaderboard(battles, rounds=50)] == ["A", "B", "C"]


def test_a_version_that_won_everything_gets_a_finite_rating() -> None:
    battles = [Battle("best", "B", 1)] * 5 + [Battle("C", "best", 0)] * 5 + [Battle("B", "C", 1)]
    ratings = bradley_terry(battles)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["best"] > ratings["B"] > ratings["C"]
    top = leaderboard(battles, rounds=100)[0]
    assert top.version == "best" and math.isfinite(top.upper)


def test_standings_count_battles_and_wins() -> None:
    battles = [Battle("A", "B", 1), Battle("B", "A", 0.5), Battle("C", "A", 0)]
    standings = {s.version: s for s in leaderboard(battles, rounds=20)}
    assert (standings["A"].battles, standings["A"].wins) == (3, 2.5)
    assert (standings["B"].battles, standings["B"].wins) == (2, 0.5)
    assert (standings["C"].battles, standings["C"].wins) == (1, 0)


def test_intervals_hold_the_estimate_and_narrow_with_more_battles() -> None:
    truth = {"v1": 1000, "v2": 1050, "v3": 1100, "v4": 1200}
    few = leaderboard(simulated(truth, 200, seed=1), rounds=300)
    many = leaderboard(simulated(truth, 4000, seed=1), rounds=300)
    for standings in (few, many):
        assert all(s.lower <= s.rating <= s.upper for s in standings)
    few_width = np.mean([s.upper - s.lower for s in few])
    many_width = np.mean([s.upper - s.lower for s in many])
    assert many_width < few_width / 2  # sqrt(20) ~ 4.5 times narrower in theory


def test_the_same_seed_gives_the_same_board() -> None:
    battles = simulated({"a": 1000, "b": 1100, "c": 1050}, 500, seed=3)
    assert leaderboard(battles, rounds=100, seed=5) == leaderboard(battles, rounds=100, seed=5)
    other = leaderboard(battles, rounds=100, seed=6)
    assert [s.rating for s in other] == [s.rating for s in leaderboard(battles, rounds=100)]
    assert [s.lower for s in other] != [s.lower for s in leaderboard(battles, rounds=100, seed=5)]


def test_swapping_sides_changes_nothing() -> None:
    battles = simulated({"a": 1000, "b": 1100, "c": 1050}, 500, seed=4)
    mirrored = [Battle(x.b, x.a, 1 - x.score_a) for x in battles]
    assert bradley_terry(mirrored) == pytest.approx(bradley_terry(battles), abs=1e-9)
    for s, m in zip(
        leaderboard(battles, rounds=100), leaderboard(mirrored, rounds=100), strict=True
    ):
        assert s.version == m.version
        assert (m.rating, m.lower, m.upper) == pytest.approx((s.rating, s.lower, s.upper), abs=1e-9)


def test_empty_input_and_bad_arguments() -> None:
    assert bradley_terry([]) == {}
    assert leaderboard([]) == []
    with pytest.raises(ValueError):
        leaderboard([Battle("a", "b", 1)], confidence=1.0)
    with pytest.raises(ValueError):
        Battle("a", "a", 1)
    with pytest.raises(ValueError):
        Battle("a", "b", 2)
