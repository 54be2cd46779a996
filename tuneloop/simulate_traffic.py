"""`tuneloop simulate --traffic N`: feedback as people give it, not as a lab collects it.

Simulated users hold N conversations of 1 to 3 turns with the real server, each through an
account of their own, and react to a share of the answers (`user_feedback`): mostly a thumb,
sometimes a regenerate (they ask again in the same conversation and go on from the answer they
like better, which the dataset builder turns into a 'regenerate' pair), a 1-5 rating, and rarely
an edit where the preference offers one (`tuneloop.preferences.improver`). Every reaction comes
from the hidden preference through the user's own threshold and noise.

Then the operator does what one would: makes rating tasks from the traffic (overlap 2 or 3 so
that agreement can be measured, a few gold tasks marked with the answer the preference likes
best), raters take `judgments` of them from the queue, a share of the raters at random or against
the preference (`bad_raters`); the training cycle weighs the raters by trust and quarantines
those under half (`feedback.raters.apply_trust`), as it does for any deployment. With
`task_selection` `active`, raters get first the tasks a reward model trained on the feedback so
far is least sure of.
"""

from __future__ import annotations

import bisect
import random
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneloop.preferences import Improver, Preference
from tuneloop.remote import follow_cycle
from tuneloop.simulate_human import Client

if TYPE_CHECKING:
    from tuneloop.simulate import SimulationConfig

USERS = 50  # accounts the conversations are spread over (a snapshot caps one user's share)
MAX_TURNS = 3
# What a user who reacts does, and how often (an edit falls back to a thumb where the
# preference offers none).
REACTIONS = (("thumbs", 0.6), ("regenerate", 0.2), ("rating", 0.15), ("edit", 0.05))
# Later turns ask questions this short at most, so that a conversation fits a small model.
FOLLOW_UP_CHARS = 80
# Judgments spent on gold tasks (each goes to every rater), and the overlaps of the others.
GOLD_SHARE = 0.15
OVERLAPS = (3, 2)
# With the `active` selection: judgments asked in this many batches, a reward model retrained
# and the tasks scored again before each.
ACTIVE_BATCHES = 3
# With a selection that chooses (`random`, `active`), the operator makes this many times the
# tasks the judgments can cover, so that the queue's order decides which are judged; `oldest`
# gets just enough, as an operator who made tasks for a budget would.
TASK_POOL = 3


@dataclass(frozen=True)
class Person:
    """A simulated user: where their thumbs turn up (a quantile of the answers' scores) and
    how often their reaction goes against their own preference."""

    name: str
    threshold: float
    noise: float


@dataclass(frozen=True)
class Rater:
    """A simulated rater: `honest` (the preference, a fraction `noise` flipped), `random` or
    `inverted` (a bad rater)."""

    name: str
    manner: str
    noise: float


class Traffic:
    """The users, raters and operator of one simulation; `converse` and `rate` once per round,
    then `summary` for the keys traffic mode adds to the simulation's summary."""

    def __init__(
        self,
        client: Client,
        questions: Sequence[str],
        preference: Preference,
        improve: Improver | None,
        config: SimulationConfig,
        calibration: Sequence[float],
        rng: random.Random,
    ) -> None:
        self.client, self.questions, self.config = client, list(questions), config
        self.preference, self.improve, self.rng = preference, improve, rng
        # The users' scale: a score's place among the baseline's answers (people judge an
        # answer against the answers they are used to, whatever the preference's units).
        self.scale = sorted(calibration) or [0.0]
        self.follow_ups = [q for q in self.questions if len(q) <= FOLLOW_UP_CHARS] or self.questions
        self.people = [
            Person(f"sim-user-{i}", rng.uniform(0.3, 0.7), rng.uniform(0, 2 * config.noise))
            for i in range(USERS)
        ]
        self.raters = _raters(config, rng)
        self.reactions: Counter[str] = Counter()
        self.judgments = 0
        self._asked: set[str] = set()  # first questions of the traffic: what tasks may hold
        self._tasks = 0  # tasks made
        self._lock = threading.Lock()

    # ---- users -------------------------------------------------------------------------------

    def converse(self, round_no: int) -> None:
        """This round's share of the conversations, `config.concurrency` at a time."""
        traffic, rounds = self.config.traffic, self.config.rounds
        first = traffic * round_no // rounds
        numbers = range(first, first + _share(traffic, rounds, round_no))
        seeds = {i: self.rng.random() for i in numbers}
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            list(pool.map(lambda i: self._conversation(i, random.Random(seeds[i])), numbers))

    def _conversation(self, number: int, rng: random.Random) -> None:
        """One conversation: a question from the pool, then short follow-ups; a regenerate
        always gets a next turn (the dataset learns which answer was kept from its history)."""
        person = self.people[number % USERS]
        question = self.questions[number % len(self.questions)]
        messages: list[dict[str, str]] = []
        conversation_id: int | None = None
        turns, turn = rng.randint(1, MAX_TURNS), 0
        while turn < turns:
            messages.append({"role": "user", "content": question})
            reply = self._ask(messages, conversation_id, person.name)
            if reply is None:
                return
            conversation_id = reply["conversation_id"]
            if turn == 0:
                with self._lock:
                    self._asked.add(question)
            reacted = self._react(person, messages, reply, rng)
            if reacted is None:
                return
            text, regenerated = reacted
            if regenerated:  # the answer kept shows in the next turn's history
                turns = max(turns, turn + 2)
            messages.append({"role": "assistant", "content": text})
            question = rng.choice(self.follow_ups)
            turn += 1

    def _ask(
        self, messages: list[dict[str, str]], conversation_id: int | None, user: str
    ) -> dict[str, Any] | None:
        """An answer in the conversation; None when the conversation no longer fits the
        model's context (400): the user stops there."""
        body = {
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "conversation_id": conversation_id,
        }
        headers = self.client.signed_in(user, "user")
        resp = self.client.http.post("/v1/chat/completions", json=body, headers=headers)
        if resp.status_code == 400:
            return None
        resp.raise_for_status()
        return resp.json()

    def _react(
        self,
        person: Person,
        messages: list[dict[str, str]],
        reply: dict[str, Any],
        rng: random.Random,
    ) -> tuple[str, bool] | None:
        """Maybe react to an answer; the answer the conversation goes on from and whether it was
        regenerated (None if the regenerate no longer fits)."""
        text = _text(reply)
        if rng.random() >= self.config.user_feedback:
            return text, False
        prompt = messages[-1]["content"]
        kind = rng.choices([k for k, _ in REACTIONS], [w for _, w in REACTIONS])[0]
        edited = self.improve(prompt, text) if kind == "edit" and self.improve else None
        if kind == "edit" and (
            edited is None or self.preference(prompt, edited) <= self.preference(prompt, text)
        ):
            kind = "thumbs"
        if kind == "regenerate":
            again = self._ask(messages, reply["conversation_id"], person.name)
            if again is None:
                return None
            self._count("regenerate")
            return _kept(prompt, text, _text(again), self.preference, person, rng), True
        place = self._place(self.preference(prompt, text))
        body: dict[str, Any] = {"kind": kind, "response_id": int(reply["id"])}
        if kind == "thumbs":
            up = (place > person.threshold) != (rng.random() < person.noise)
            body["value"] = 1 if up else -1
        elif kind == "rating":
            value = min(5, 1 + int(place * 5))
            body["value"] = rng.randint(1, 5) if rng.random() < person.noise else value
        else:
            body["text"] = edited
        headers = self.client.signed_in(person.name, "user")
        self.client.http.post("/v1/feedback", json=body, headers=headers).raise_for_status()
        self._count(kind)
        return text, False

    def _place(self, score: float) -> float:
        """The share of the baseline's answers scoring below `score` (ties count half)."""
        below = bisect.bisect_left(self.scale, score)
        tied = bisect.bisect_right(self.scale, score) - below
        return (below + tied / 2) / len(self.scale)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.reactions[kind] += 1

    # ---- operator and raters -----------------------------------------------------------------

    def rate(self, round_no: int) -> None:
        """This round's judgments: tasks from the traffic, gold marked, raters through the
        queue (the cycle weighs them, and quarantines those trusted too little). With the
        `active` selection the judgments come in `ACTIVE_BATCHES`, each asked in the order of a
        reward model trained on all the feedback so far (the users' reactions at first) and
        scoring the open tasks."""
        budget = _share(self.config.judgments, self.config.rounds, round_no)
        if budget <= 0 or not self.raters:
            return
        self._make_tasks(budget)
        batches = ACTIVE_BATCHES if self.config.task_selection == "active" else 1
        for batch in range(batches):
            if batches > 1:
                self._rescore()
            self.judgments += self._judge(_share(budget, batches, batch))
        self.config.log(f"{self.judgments} judgments")

    def _rescore(self) -> None:
        """Train a reward model on the feedback so far, and score the open tasks with it."""
        self.client.admin("POST", "train", {"kind": "rm"})
        cycle = follow_cycle(
            lambda route: self.client.admin("GET", route.removeprefix("/v1/admin/")),
            self.config.log,
        )
        if cycle.get("status") != "done":
            self.config.log(f"no reward model to ask by: {cycle.get('error')}")
            return
        scored = self.client.admin("POST", "tasks/score")
        self.config.log(f"tasks scored by {cycle.get('reward_version')}: {scored['scored']}")

    def _make_tasks(self, budget: int) -> None:
        """Tasks for `budget` judgments: a `GOLD_SHARE` on gold tasks that every rater judges,
        the rest on tasks of overlap 3 and 2 in turn (`TASK_POOL` times as many of those where
        the selection chooses among them). No more tasks than the traffic's own
        questions. A gold candidate with no single best answer stays a task of overlap 2."""
        gold = min(round(budget * GOLD_SHARE / len(self.raters)), len(self._asked) - self._tasks)
        if gold > 0:
            body = {"source": "traffic", "limit": gold, "overlap": min(OVERLAPS)}
            made = self.client.admin("POST", "tasks", body)["made"]
            self._tasks += len(made)
            marked = self._mark_gold(made)
            budget -= marked * len(self.raters) + (len(made) - marked) * min(OVERLAPS)
        overlaps = _overlaps(budget)
        if self.config.task_selection != "oldest":
            overlaps *= TASK_POOL
        for overlap in OVERLAPS:
            wanted = min(overlaps.count(overlap), len(self._asked) - self._tasks)
            if wanted > 0:
                body = {"source": "traffic", "limit": wanted, "overlap": overlap}
                self._tasks += len(self.client.admin("POST", "tasks", body)["made"])

    def _mark_gold(self, task_ids: list[int]) -> int:
        """Gold: the answer the hidden preference likes best, where one answer is best; how many
        tasks were marked."""
        marked = 0
        for task_id in task_ids:
            task = self.client.admin("GET", f"tasks/{task_id}")
            prompt = task["prompt"][-1]["content"]
            scored = sorted((self.preference(prompt, a["text"]), a["id"]) for a in task["answers"])
            if scored[-1][0] > scored[-2][0]:
                self.client.admin("POST", f"tasks/{task_id}/gold", {"response_id": scored[-1][1]})
                marked += 1
        return marked

    def _judge(self, budget: int) -> int:
        """Every rater takes comparison tasks from the queue until none is left for them or
        `budget` judgments are made between them all; judgments made."""
        left = [budget]
        seeds = [self.rng.random() for _ in self.raters]

        def rate(number: int) -> int:
            rater, flips = self.raters[number], random.Random(seeds[number])
            headers = self.client.signed_in(rater.name, "rater")
            done = 0
            while True:
                with self._lock:
                    if left[0] <= 0:
                        return done
                    left[0] -= 1
                got = self.client.http.get("/v1/tasks/next?kind=comparison", headers=headers)
                got.raise_for_status()
                task = got.json()["task"]
                if task is None:
                    with self._lock:
                        left[0] += 1  # not spent: another rater may still have tasks
                    return done
                winner = _verdict(rater, task, self.preference, flips)
                route = f"/v1/tasks/{task['task_id']}/judgment"
                posted = self.client.http.post(route, json={"winner": winner}, headers=headers)
                posted.raise_for_status()
                done += 1

        with ThreadPoolExecutor(len(self.raters)) as pool:
            return sum(pool.map(rate, range(len(self.raters))))

    # ---- summary -----------------------------------------------------------------------------

    def summary(self, rows_by_kind: dict[str, int]) -> dict[str, Any]:
        """What traffic mode adds to the simulation's summary: feedback rows per kind as stored
        (`rows_by_kind`, from the server's stats), the users' reactions as sent, judgments, and
        the share of each group of raters quarantined or weighed below half (None for an empty
        group)."""
        report = self.client.admin("GET", "raters")["raters"]
        held = {r["name"] for r in report if r["quarantined"] or _down_weighted(r)}
        bad = [r.name for r in self.raters if r.manner != "honest"]
        honest = [r.name for r in self.raters if r.manner == "honest"]
        return {
            "traffic": self.config.traffic,
            "user_feedback": self.config.user_feedback,
            "rows_by_kind": rows_by_kind,
            "reactions": dict(sorted(self.reactions.items())),
            "judgments": self.judgments,
            "raters": len(self.raters),
            "bad_raters": len(bad),
            "bad_raters_caught": _caught(bad, held),
            "honest_raters_caught": _caught(honest, held),
        }


def _raters(config: SimulationConfig, rng: random.Random) -> list[Rater]:
    """`config.raters` raters, `bad_raters` of them bad (random and inverted in turn), in an
    order drawn so that the bad ones are not always the first to fetch."""
    bad = round(config.bad_raters * config.raters)
    manners = [("random", "inverted")[i % 2] for i in range(bad)]
    manners += ["honest"] * (config.raters - bad)
    rng.shuffle(manners)
    return [Rater(f"sim-rater-{i}", m, config.noise) for i, m in enumerate(manners)]


def _verdict(rater: Rater, task: dict[str, Any], preference: Preference, rng: random.Random) -> str:
    """A rater's winner of a comparison task."""
    if rater.manner == "random":
        return rng.choice("ab")
    prompt = task["prompt"][-1]["content"]
    a, b = (preference(prompt, text) for text in task["answers"])
    winner = "a" if a > b else "b" if b > a else "tie"
    flipped = rater.manner == "inverted" or rng.random() < rater.noise
    return {"a": "b", "b": "a"}.get(winner, winner) if flipped else winner


def _kept(
    prompt: str,
    first: str,
    second: str,
    preference: Preference,
    person: Person,
    rng: random.Random,
) -> str:
    """The answer a user goes on from after a regenerate: the one the preference likes better,
    but the other one a fraction `person.noise` of the time; on a tie, either."""
    a, b = preference(prompt, first), preference(prompt, second)
    better = first if a > b else second if b > a else rng.choice((first, second))
    worse = second if better is first else first
    return worse if rng.random() < person.noise else better


def _overlaps(judgments: int) -> list[int]:
    """Overlaps of 3 and 2 in turn whose sum is at most `judgments`."""
    made: list[int] = []
    while judgments >= min(OVERLAPS):
        wanted = OVERLAPS[len(made) % len(OVERLAPS)]
        made.append(wanted if wanted <= judgments else min(OVERLAPS))
        judgments -= made[-1]
    if judgments and min(OVERLAPS) in made:  # one left: a task of the larger overlap instead
        made[made.index(min(OVERLAPS))] += judgments
    return made


def _share(total: int, rounds: int, round_no: int) -> int:
    """Round `round_no`'s part of `total`, the parts as even as whole numbers allow."""
    return total * (round_no + 1) // rounds - total * round_no // rounds


def _down_weighted(rater: dict[str, Any]) -> bool:
    """Weighed below half in training, where the server reports trust weights."""
    weight = rater.get("weight")
    return weight is not None and weight < 0.5


def _caught(names: list[str], held: set[str]) -> float | None:
    return round(sum(n in held for n in names) / len(names), 4) if names else None


def _text(reply: dict[str, Any]) -> str:
    return reply["choices"][0]["message"]["content"]
