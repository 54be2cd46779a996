"""Benchmark: does the arena leaderboard find the right order, and do its intervals cover the
truth as often as they claim? And do the agreement measures single out a careless rater?

1. Arena: four versions with true Bradley-Terry ratings (1000, 1040, 1080, 1150). Each trial
   draws `--battles` battles between uniformly random pairs: a tie with probability 0.1, else a
   win for a with the probability that makes a's expected score the Bradley-Terry one (so ties,
   counted half, do not bias the fit), then runs `leaderboard(rounds=--rounds)`. Reported over
   `--trials` trials: the fraction whose fitted order is the true order, and per version the
   fraction of 95 % intervals holding its true rating. Ratings are only defined up to a shift,
   so the truth is centered on the fit's mean (1000) first.
2. Raters: 300 tasks with two possible winners; three raters give the true verdict flipped with
   probability 0.1, one answers uniformly at random. Reported: Krippendorff's alpha with and
   without the random rater, each rater's alpha and accuracy against the truth.

    python bench/arena_coverage.py [--trials 100] [--battles 2000] [--rounds 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from tuneloop.feedback.agreement import gold_accuracy, krippendorff_alpha, rater_alpha
from tuneloop.feedback.arena import Battle, leaderboard

TRUE_RATINGS = {"v1": 1000.0, "v2": 1040.0, "v3": 1080.0, "v4": 1150.0}
TIE_PROBABILITY = 0.1
CONFIDENCE = 0.95
TASKS = 300
FLIP_PROBABILITY = 0.1
CAREFUL_RATERS = ("ann", "bob", "cid")
RANDOM_RATER = "rnd"


def simulate_battles(rng: np.random.Generator, n: int) -> list[Battle]:
    names = list(TRUE_RATINGS)
    truth = np.array(list(TRUE_RATINGS.values()))
    first = rng.integers(0, len(names), size=n)
    second = (first + rng.integers(1, len(names), size=n)) % len(names)  # never first itself
    expected = 1 / (1 + 10 ** ((truth[second] - truth[first]) / 400))
    half_tie = TIE_PROBABILITY / 2
    win_unless_tie = np.clip((expected - half_tie) / (1 - TIE_PROBABILITY), 0, 1)
    tie = rng.random(n) < TIE_PROBABILITY
    score = np.where(tie, 0.5, (rng.random(n) < win_unless_tie).astype(float))
    return [
        Battle(names[a], names[b], float(s)) for a, b, s in zip(first, second, score, strict=True)
    ]


@dataclass(frozen=True)
class ArenaFigures:
    ordered: float  # fraction of trials with the true order
    covered: dict[str, float]  # per version, fraction of intervals holding the centered truth
    fitted: dict[str, float]  # per version, mean rating shifted onto the truth's mean
    width: dict[str, float]  # per version, mean interval width
    fit_seconds: float  # mean wall seconds of one leaderboard()


def arena_trials(trials: int, battles: int, rounds: int, seed: int) -> ArenaFigures:
    rng = np.random.default_rng(seed)
    names = list(TRUE_RATINGS)
    true_order = sorted(names, key=TRUE_RATINGS.__getitem__, reverse=True)
    true_mean = np.mean(list(TRUE_RATINGS.values()))
    ordered = 0
    covered = dict.fromkeys(names, 0)
    fitted: dict[str, list[float]] = {name: [] for name in names}
    widths: dict[str, list[float]] = {name: [] for name in names}
    fit_seconds = 0.0
    for trial in range(trials):
        sample = simulate_battles(rng, battles)
        started = time.perf_counter()
        board = leaderboard(sample, rounds=rounds, confidence=CONFIDENCE, seed=seed + trial)
        fit_seconds += time.perf_counter() - started
        ordered += [s.version for s in board] == true_order
        fit_mean = np.mean([s.rating for s in board])
        for s in board:
            centered_truth = TRUE_RATINGS[s.version] - true_mean + fit_mean
            covered[s.version] += s.lower <= centered_truth <= s.upper
            fitted[s.version].append(s.rating - fit_mean + true_mean)
            widths[s.version].append(s.upper - s.lower)
    return ArenaFigures(
        ordered=ordered / trials,
        covered={name: covered[name] / trials for name in names},
        fitted={name: float(np.mean(fitted[name])) for name in names},
        width={name: float(np.mean(widths[name])) for name in names},
        fit_seconds=fit_seconds / trials,
    )


def rater_study(seed: int) -> tuple[dict[int, dict[str, int]], dict[int, int]]:
    """Units {task: {rater: verdict}} of the simulated raters, and the true verdicts."""
    rng = np.random.default_rng(seed)
    truth = {task: int(rng.integers(0, 2)) for task in range(TASKS)}
    units: dict[int, dict[str, int]] = {}
    for task, verdict in truth.items():
        units[task] = {r: verdict ^ int(rng.random() < FLIP_PROBABILITY) for r in CAREFUL_RATERS}
        units[task][RANDOM_RATER] = int(rng.integers(0, 2))
    return units, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--battles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    arena = arena_trials(args.trials, args.battles, args.rounds, args.seed)
    print(
        f"Arena: {args.trials} trials x {args.battles} battles, {args.rounds} bootstrap rounds, "
        f"{CONFIDENCE:.0%} intervals; mean fit shifted onto the truth's mean"
    )
    print(f"{'version':<8} {'truth':>7} {'mean fit':>9} {'mean width':>11} {'coverage':>9}")
    for name, truth in TRUE_RATINGS.items():
        print(
            f"{name:<8} {truth:>7.0f} {arena.fitted[name]:>9.1f} "
            f"{arena.width[name]:>11.1f} {arena.covered[name]:>9.2f}"
        )
    overall = np.mean(list(arena.covered.values()))
    print(f"correct order: {arena.ordered:.2f} of trials; coverage overall: {overall:.3f}")
    print(f"leaderboard(): {arena.fit_seconds:.3f} s per trial")

    units, truth = rater_study(args.seed)
    without_random = {
        task: {r: v for r, v in ratings.items() if r != RANDOM_RATER}
        for task, ratings in units.items()
    }
    alphas = rater_alpha(units)
    gold = gold_accuracy((r, v, truth[task]) for task, d in units.items() for r, v in d.items())
    print(
        f"\nRaters: {TASKS} tasks, {len(CAREFUL_RATERS)} raters flipping "
        f"{FLIP_PROBABILITY:.0%}, 1 uniformly random ({RANDOM_RATER})"
    )
    print(f"Krippendorff's alpha: all raters {krippendorff_alpha(units):.3f}, ", end="")
    print(f"without {RANDOM_RATER} {krippendorff_alpha(without_random):.3f}")
    print(f"{'rater':<8} {'alpha':>7} {'accuracy':>9}")
    for rater, alpha in alphas.items():
        print(f"{rater:<8} {alpha:>7.3f} {gold[rater].accuracy:>9.3f}")
    print(f"\nwall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
