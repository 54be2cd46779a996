"""Agreement between raters, and their accuracy against gold answers, for nominal verdicts.

Feedback trains a model only as well as the raters who give it agree on what is better. These
measures tell an operator whether a batch of verdicts is consistent enough to learn from, and
which rater drags it down:

- `krippendorff_alpha`: agreement of all raters together, corrected for chance; copes with any
  number of raters per unit and with missing verdicts.
- `rater_alpha`: the same, for the pairs one rater takes part in, to single out a careless or
  adversarial rater.
- `cohen_kappa`: chance-corrected agreement of every pair of raters over the units both judged.
- `gold_accuracy`: how often each rater gives the known answer on gold (control) units.
- `reliability`: how likely each rater is to be right, from their agreement with the others
  (weighted by how reliable those others are) and their gold answers.

`units` maps a unit (one rating task) to {rater name: the value that rater gave}; a value is any
hashable nominal verdict (the id of the winning answer, "tie", ...). A rater who did not judge a
unit is simply absent from it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np

Units = Mapping[Hashable, Mapping[str, Hashable]]


@dataclass(frozen=True)
class PairKappa:
    kappa: float | None  # None when the pair's expected agreement is 1 (one value throughout)
    common: int  # units both raters judged


@dataclass(frozen=True)
class GoldScore:
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None


def _pairable(units: Units) -> list[Mapping[str, Hashable]]:
    """The units with at least two values: only those say anything about agreement."""
    return [ratings for ratings in units.values() if len(ratings) >= 2]


def coincidences(units: Units) -> tuple[list[Hashable], np.ndarray]:
    """The values (in order of first appearance) and Krippendorff's coincidence matrix over them:
    entry [c, k] counts the ordered pairs of values (c, k) from different raters of the same unit,
    each pair of a unit with m values weighted 1/(m - 1), so that every pairable value adds 1 to
    its row and the matrix sums to the number of pairable values."""
    pairable = _pairable(units)
    index: dict[Hashable, int] = {}
    for ratings in pairable:
        for value in ratings.values():
            index.setdefault(value, len(index))
    counts = np.zeros((len(pairable), len(index)))
    for row, ratings in enumerate(pairable):
        for value in ratings.values():
            counts[row, index[value]] += 1
    weighted = counts / (counts.sum(axis=1, keepdims=True) - 1)
    # Pairs of distinct values within a unit: all pairs of its values, less each value with itself.
    matrix = counts.T @ weighted - np.diag(weighted.sum(axis=0))
    return list(index), matrix


def _expected_disagreement(value_totals: np.ndarray) -> float:
    """D_e: how often two values drawn without replacement from all pairable values differ."""
    n = value_totals.sum()
    return float((n * n - (value_totals**2).sum()) / (n * (n - 1))) if n >= 2 else 0.0


def krippendorff_alpha(units: Units) -> float | None:
    """Krippendorff's alpha for nominal data, 1 - D_o / D_e: 1 is perfect agreement, 0 what
    chance gives, below 0 systematic disagreement. None when no unit has two values, or when all
    values are the same (then no disagreement is expected and alpha is undefined)."""
    _, matrix = coincidences(units)
    expected = _expected_disagreement(matrix.sum(axis=1))
    if expected == 0:
        return None
    n = matrix.sum()
    observed = (n - np.trace(matrix)) / n
    return float(1 - observed / expected)


def rater_alpha(units: Units) -> dict[str, float | None]:
    """Alpha of each rater, 1 - D_o(r) / D_e: D_o(r) is the observed disagreement over the pairs
    (r, other rater) of the units r judged, weighted 1/(m - 1) as in the coincidence matrix (so
    each of r's pairable values weighs 1, and D_o of all the data is the mean of the D_o(r)
    weighted by their values), D_e the expected disagreement of all the data. A rater who agrees
    with the others scores near the overall alpha or above, one who answers at random near 0 or
    below. None for a rater with no pairable value, or for all when alpha is undefined."""
    _, matrix = coincidences(units)
    expected = _expected_disagreement(matrix.sum(axis=1))
    disagreement: dict[str, float] = defaultdict(float)
    values: Counter[str] = Counter()
    for ratings in _pairable(units):
        others = len(ratings) - 1
        tally = Counter(ratings.values())
        for rater, value in ratings.items():
            disagreement[rater] += (others + 1 - tally[value]) / others
            values[rater] += 1
    raters = sorted({rater for ratings in units.values() for rater in ratings})
    return {
        rater: 1 - disagreement[rater] / values[rater] / expected
        if values[rater] and expected
        else None
        for rater in raters
    }


def _kappa(judgements: list[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa of two raters' paired values, (p_o - p_e) / (1 - p_e), in integer counts so
    that "expected agreement is 1" is an exact test."""
    n = len(judgements)
    agreed = sum(first == second for first, second in judgements)
    firsts = Counter(first for first, _ in judgements)
    seconds = Counter(second for _, second in judgements)
    chance = sum(count * seconds[value] for value, count in firsts.items())
    if chance == n * n:
        return None
    return (agreed * n - chance) / (n * n - chance)


def cohen_kappa(units: Units, min_common: int = 1) -> dict[tuple[str, str], PairKappa]:
    """Cohen's kappa of every pair of raters (the key sorted alphabetically) over the units both
    judged; pairs with fewer than `min_common` such units (or none) are left out."""
    paired: dict[tuple[str, str], list[tuple[Hashable, Hashable]]] = defaultdict(list)
    for ratings in units.values():
        for first, second in combinations(sorted(ratings), 2):
            paired[first, second].append((ratings[first], ratings[second]))
    return {
        pair: PairKappa(_kappa(judgements), len(judgements))
        for pair, judgements in sorted(paired.items())
        if len(judgements) >= min_common
    }


def gold_accuracy(answers: Iterable[tuple[str, Hashable, Hashable]]) -> dict[str, GoldScore]:
    """Per rater, how many of their answers (rater, value given, gold value) match the gold."""
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for rater, given, gold in answers:
        correct[rater] += given == gold
        total[rater] += 1
    return {rater: GoldScore(correct[rater], total[rater]) for rater in sorted(total)}


# The partner a gold answer is: always right (no rater's name starts with NUL).
_GOLD = "\x00gold"


@dataclass(frozen=True)
class Reliability:
    value: float  # 2p - 1, p the chance the rater is right: 1 always, 0 a coin flip, -1 never
    evidence: float  # votes' worth behind it: each vote counts its partners' value squared


def reliability(
    units: Units,
    gold: Iterable[tuple[str, Hashable, Hashable]] = (),
    *,
    rounds: int = 50,
) -> dict[str, Reliability]:
    """Each rater's reliability r = 2p - 1, p the chance they give the right verdict.

    The model: raters are right with their own p, independently. Two raters' agreement, corrected
    for chance ((agreement - chance) / (1 - chance), as kappa), is then r_a * r_b (exactly so for
    two answers and balanced verdicts), and a gold answer is a partner with r = 1. So the r are the
    rank-one fit of the pairwise agreements: alternating least squares, each pair weighted by the
    votes it shares (1/(m - 1) per unit of m votes, as alpha weighs them). From r = 1 for all, the
    first round gives each rater their chance-corrected agreement with everyone (close to their
    alpha in the report); each further round divides it by how reliable their partners are, so
    that an honest rater paired with bad ones is not blamed for them, and an inverted rater, whose
    r comes out negative, tells about their partners instead of spoiling their agreement. The
    orientation (r > 0 means agreeing with the bulk of the votes and with gold) comes from the
    start at 1 and from gold. `evidence`, the sum over the rater's votes of their partners' r^2
    (1 for a gold vote), is how many votes' worth the estimate rests on: a vote shared with a coin
    flipper says nothing. A rater without evidence is left out.
    """
    agree: dict[tuple[str, str], float] = defaultdict(float)
    shared: dict[tuple[str, str], float] = defaultdict(float)
    seen: Counter[Hashable] = Counter()
    for ratings in _pairable(units):
        share = 1 / (len(ratings) - 1)
        for rater, value in ratings.items():
            seen[value] += 1
            for other, theirs in ratings.items():
                if other != rater:
                    shared[rater, other] += share
                    agree[rater, other] += share * (value == theirs)
    for rater, given, answer in gold:
        seen[given] += 1
        shared[rater, _GOLD] += 1
        agree[rater, _GOLD] += given == answer
    total = sum(seen.values())
    chance = sum(n * n for n in seen.values()) / total**2 if total else 1.0
    if chance >= 1:  # one verdict throughout: agreement says nothing
        return {}
    kappa = {pair: (agree[pair] / n - chance) / (1 - chance) for pair, n in shared.items()}
    raters = sorted({rater for rater, _ in shared})
    value = dict.fromkeys(raters, 1.0)
    evidence = dict.fromkeys(raters, 0.0)
    for _ in range(rounds):
        fit: dict[str, float] = defaultdict(float)
        evidence = dict.fromkeys(raters, 0.0)
        for (rater, other), n in shared.items():
            partner = value.get(other, 1.0)  # only gold is no rater
            fit[rater] += n * partner * kappa[rater, other]
            evidence[rater] += n * partner**2
        value = {
            rater: min(1.0, max(-1.0, fit[rater] / evidence[rater])) if evidence[rater] else 0.0
            for rater in raters
        }
    return {
        rater: Reliability(value[rater], evidence[rater]) for rater in raters if evidence[rater]
    }
