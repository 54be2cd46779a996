"""A leaderboard of model versions from pairwise battles: Bradley-Terry ratings with percentile
bootstrap intervals, the method Chatbot Arena reports.

A battle is one comparison of two versions' answers, won by one side or tied. Bradley-Terry gives
each version a strength such that P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)): the Elo
scale, where 400 points are 10:1 odds. Unlike online Elo updates, the maximum-likelihood fit does
not depend on the order of the battles, and the bootstrap says how far the data pin each rating
down, which decides whether a new version is really better or only lucky.

Ratings are only defined up to a common shift; they are centered so that their mean is 1000.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BASE_RATING = 1000.0
ELO_PER_LOG_ODDS = 400 / math.log(10)
# Precision of a Gaussian prior on each strength (in natural log-odds units) toward the mean.
# Near the mean it curves the likelihood as much as 1/250 of a tie against an average version
# would (a tie's log-likelihood has curvature 1/4 there): enough to give a version that won every
# battle a finite rating, too little to matter otherwise (it narrows the gap of a 3-1 record,
# 400 log10(3) = 190.85 points, by 0.13).
# The penalized optimum has strengths summing to 0, i.e. it is centered on the mean by itself.
PRIOR_PRECISION = 1e-3
NEWTON_TOLERANCE = 1e-10  # the largest change of a centered strength (log-odds) at convergence
MAX_NEWTON_STEPS = 200
MAX_STEP_HALVINGS = 40
SUFFICIENT_DECREASE = 1e-4  # Armijo's constant for the backtracking line search
ROUNDS_PER_BATCH = 100  # bootstrap fits solved together: arrays of 100 x versions^2


@dataclass(frozen=True)
class Battle:
    a: str
    b: str
    score_a: float  # 1: a won, 0: b won, 0.5: a tie

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"a battle needs two versions, not {self.a!r} twice")
        if not 0 <= self.score_a <= 1:
            raise ValueError(f"score_a must lie in [0, 1], not {self.score_a}")


@dataclass(frozen=True)
class Standing:
    version: str
    rating: float
    lower: float  # the bootstrap interval's bounds
    upper: float
    battles: int
    wins: float  # ties count half


@dataclass(frozen=True)
class _Outcomes:
    """The distinct (first, second, score) results among the battles, each with its count; first
    is always the lower version index, so a battle and its mirror image are the same outcome."""

    versions: list[str]
    first: np.ndarray
    second: np.ndarray
    score: np.ndarray  # of first against second
    count: np.ndarray

    def wins(self, counts: np.ndarray) -> np.ndarray:
        """wins[r, i, j]: how often i beat j (ties half) with `counts[r]` of each outcome."""
        k = len(self.versions)
        per_outcome = np.zeros((len(self.count), k * k))
        rows = np.arange(len(self.count))
        np.add.at(per_outcome, (rows, self.first * k + self.second), self.score)
        np.add.at(per_outcome, (rows, self.second * k + self.first), 1 - self.score)
        return (counts @ per_outcome).reshape(len(counts), k, k)


def _outcomes(battles: Sequence[Battle]) -> _Outcomes:
    versions = sorted({v for battle in battles for v in (battle.a, battle.b)})
    index = {v: i for i, v in enumerate(versions)}
    tally: Counter[tuple[int, int, float]] = Counter()
    for battle in battles:
        a, b = index[battle.a], index[battle.b]
        tally[(a, b, battle.score_a) if a < b else (b, a, 1 - battle.score_a)] += 1
    first, second, score = (np.array(column) for column in zip(*tally, strict=True))
    return _Outcomes(versions, first, second, score.astype(float), np.array(list(tally.values())))


def _objective(theta: np.ndarray, wins: np.ndarray) -> np.ndarray:
    """Negative penalized log-likelihood of each row's strengths."""
    margin = theta[:, :, None] - theta[:, None, :]
    loss = (wins * np.logaddexp(0, -margin)).sum(axis=(1, 2))
    return loss + PRIOR_PRECISION / 2 * (theta**2).sum(axis=1)


def _fit(wins: np.ndarray) -> np.ndarray:
    """Strengths (natural log-odds) maximizing the penalized likelihood of each row of `wins`
    (rounds x versions x versions), by Newton's method with a backtracking line search: the
    objective is strictly convex, so this converges from zero, in a few steps where the data are
    balanced and in a dozen or two where a version won (nearly) everything."""
    rounds, k = wins.shape[:2]
    games = wins + wins.swapaxes(1, 2)
    won = wins.sum(axis=2)
    theta = np.zeros((rounds, k))
    for _ in range(MAX_NEWTON_STEPS):
        margin = theta[:, :, None] - theta[:, None, :]
        p = 0.5 * (1 + np.tanh(margin / 2))  # the logistic function, without overflow
        gradient = (games * p).sum(axis=2) - won + PRIOR_PRECISION * theta
        curvature = games * p * (1 - p)
        hessian = np.eye(k) * (curvature.sum(axis=2) + PRIOR_PRECISION)[:, :, None] - curvature
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        decrease = (gradient * step).sum(axis=1)
        current = _objective(theta, wins)
        length = np.ones(rounds)
        for _ in range(MAX_STEP_HALVINGS):
            trial = _objective(theta - length[:, None] * step, wins)
            # The allowance for rounding keeps converged rows from halving needlessly.
            slack = 1e-12 * (1 + np.abs(current))
            short = trial > current - SUFFICIENT_DECREASE * length * decrease + slack
            if not short.any():
                break
            length[short] /= 2
        change = length[:, None] * step
        theta -= change
        # Only differences matter: rounding noise in the gradient moves all strengths together
        # by far more than the tolerance, as the prior alone curves the likelihood that way.
        if np.abs(change - change.mean(axis=1, keepdims=True)).max() < NEWTON_TOLERANCE:
            break
    return theta


def _ratings(theta: np.ndarray) -> np.ndarray:
    return BASE_RATING + ELO_PER_LOG_ODDS * (theta - theta.mean(axis=1, keepdims=True))


def bradley_terry(battles: Sequence[Battle]) -> dict[str, float]:
    """Maximum-likelihood (weakly penalized, see `PRIOR_PRECISION`) Bradley-Terry ratings on the
    Elo scale, centered on 1000; ties count half a win to each side. Empty input: {}."""
    if not battles:
        return {}
    outcomes = _outcomes(battles)
    ratings = _ratings(_fit(outcomes.wins(outcomes.count[None])))[0]
    return dict(zip(outcomes.versions, ratings.tolist(), strict=True))


def leaderboard(
    battles: Sequence[Battle], *, rounds: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[Standing]:
    """`bradley_terry` ratings with `confidence` percentile bootstrap intervals, best first.

    Each of the `rounds` bootstrap samples draws as many battles as there are, with replacement:
    a multinomial over the distinct outcomes, which is the same distribution as resampling the
    battles themselves, without building the lists. A version absent from a sample gets the mean
    rating there (the prior's pull), as in a fit that never saw it."""
    if rounds < 1 or not 0 < confidence < 1:
        raise ValueError(f"need rounds >= 1 and 0 < confidence < 1, not {rounds}, {confidence}")
    if not battles:
        return []
    outcomes = _outcomes(battles)
    point = _ratings(_fit(outcomes.wins(outcomes.count[None])))[0]
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(battles), outcomes.count / len(battles), size=rounds)
    sampled = np.concatenate(
        [
            _ratings(_fit(outcomes.wins(draws[start : start + ROUNDS_PER_BATCH])))
            for start in range(0, rounds, ROUNDS_PER_BATCH)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    lower, upper = np.percentile(sampled, [tail, 100 - tail], axis=0)
    played: Counter[str] = Counter()
    wins: Counter[str] = Counter()
    for battle in battles:
        played.update((battle.a, battle.b))
        wins[battle.a] += battle.score_a
        wins[battle.b] += 1 - battle.score_a
    standings = [
        Standing(v, float(point[i]), float(lower[i]), float(upper[i]), played[v], wins[v])
        for i, v in enumerate(outcomes.versions)
    ]
    return sorted(standings, key=lambda s: (-s.rating, s.version))
