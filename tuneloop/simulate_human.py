"""`tuneloop simulate --human-gate`: after the reward model's gate, simulated people decide.

The candidate that passed is held in canary by the server (`tuneloop.loop.canary`). Simulated
users then ask new questions through the API, and the server answers a share of the
conversations with the canary; the operator makes rating tasks from that traffic (each pits an
answer of the canary against one of the served version, blind); simulated raters fetch them from
the queue and judge them with the preference (a fraction `noise` flipped), until the human gate
has the judgments it waits for and promotes or rejects the canary.

With `attacker` judgments, one plain account first tries to push the canary through by itself,
through every route a user has: it asks one question again and again in new conversations until
it holds answers of both versions (the canary answers its share of conversations), then compares
and ranks them with the canary's first and gives the canary's a thumbs up and the served
version's a thumbs down; and it asks the raters' queue for a task. None of that may count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from tuneloop.preferences import Preference

# Users' questions asked per round, and raters judging at once.
ROUND_QUESTIONS = 24
HUMAN_RATERS = 6
MAX_ROUNDS = 100


class Client(Protocol):
    http: Any

    def signed_in(self, name: str, role: str) -> dict[str, str]: ...

    def chat(
        self, prompt: str, max_tokens: int, temperature: float, user: str
    ) -> dict[str, Any]: ...

    def admin(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any: ...


def judge_canary(
    client: Client,
    questions: Sequence[str],
    preference: Preference,
    *,
    noise: float,
    max_tokens: int,
    temperature: float,
    concurrency: int,
    rng: random.Random,
    log: Callable[[str], None],
    attacker: int = 0,
) -> dict[str, Any]:
    """Traffic, tasks and judgments until the running canary is decided; its record, with what
    the attacker sent (`attack`) when there was one."""
    attack = _attack(client, questions[0], attacker, concurrency, log) if attacker else None
    asked = 0
    for round_no in range(MAX_ROUNDS):
        batch = [questions[(asked + i) % len(questions)] for i in range(ROUND_QUESTIONS)]
        asked += len(batch)

        def ask(i: int, batch: Sequence[str] = batch) -> None:
            client.chat(batch[i], max_tokens, temperature, f"sim-user-{i % 50}")

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, range(len(batch))))
        client.admin("POST", "tasks", {"source": "traffic", "limit": len(batch), "overlap": 1})
        judged = _judge_tasks(client, preference, noise, rng)
        client.admin("POST", "canary/check")
        state = client.admin("GET", "canary")
        if state["running"] is None:
            decided = state["history"][0]
            log(f"human gate: {decided['status']} after {round_no + 1} rounds")
            return decided | ({"attack": attack} if attack else {})
        verdict = state["running"]["verdict"]
        log(
            f"human gate, round {round_no + 1}: {judged} judged; {verdict['judgments']} of "
            f"{state['running']['min_judgments']} judgments, win rate {verdict['win_rate']}"
        )
    raise RuntimeError(f"the canary was not decided in {MAX_ROUNDS} rounds")


def _judge_tasks(client: Client, preference: Preference, noise: float, rng: random.Random) -> int:
    """Every rater takes tasks from the queue until none is left for them; judgments made."""
    seeds = [rng.random() for _ in range(HUMAN_RATERS)]

    def rate(number: int) -> int:
        headers = client.signed_in(f"sim-judge-{number}", "rater")
        flips = random.Random(seeds[number])
        done = 0
        while True:
            got = client.http.get("/v1/tasks/next?kind=comparison", headers=headers)
            got.raise_for_status()
            task = got.json()["task"]
            if task is None:
                return done
            prompt = task["prompt"][-1]["content"]
            a, b = (preference(prompt, text) for text in task["answers"])
            winner = "a" if a > b else "b" if b > a else "tie"
            if flips.random() < noise and winner != "tie":
                winner = "b" if winner == "a" else "a"
            route = f"/v1/tasks/{task['task_id']}/judgment"
            client.http.post(route, json={"winner": winner}, headers=headers).raise_for_status()
            done += 1

    with ThreadPoolExecutor(HUMAN_RATERS) as pool:
        return sum(pool.map(rate, range(HUMAN_RATERS)))


ATTACKER = "sim-attacker"
# Asks of one question, at most, for answers of both versions.
ATTACK_ASKS = 400


def _attack(
    client: Client, question: str, judgments: int, concurrency: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """One plain account sends `judgments` judgments for the canary through a user's routes;
    how many each route stored, and whether the raters' queue refused it."""
    headers = client.signed_in(ATTACKER, "user")
    canary = client.admin("GET", "canary")["running"]["version"]
    answers: dict[str, list[int]] = {}

    def ask(_: int) -> None:
        done = client.chat(question, 4, 1.0, ATTACKER)
        answers.setdefault(done["model"], []).append(int(done["id"]))

    for _ in range(ATTACK_ASKS // concurrency):
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, range(concurrency)))
        if answers.get(canary) and len(answers) > 1 and len(answers[canary]) ** 2 > judgments:
            break
    mine = answers.get(canary, [])
    theirs = [rid for version, ids in answers.items() if version != canary for rid in ids]
    if not mine or not theirs:
        raise RuntimeError(f"the attacker got no answers of both versions in {ATTACK_ASKS} asks")
    bodies = _attack_bodies(mine, theirs, judgments)
    stored = {"comparison": 0, "ranking": 0, "thumbs": 0}
    for body in bodies:
        sent = client.http.post("/v1/feedback", json=body, headers=headers)
        if sent.status_code == 201:
            stored[body["kind"]] += 1
    queue = client.http.get("/v1/tasks/next", headers=headers).status_code
    log(f"attacker: {len(bodies)} judgments for {canary} sent, {sum(stored.values())} stored")
    return {"sent": len(bodies), "stored": stored, "tasks_next_status": queue}


def _attack_bodies(mine: list[int], theirs: list[int], judgments: int) -> list[dict[str, Any]]:
    """`judgments` votes for the canary's answers `mine` over `theirs`, each on a new item (one
    vote per item counts): comparisons, rankings and thumbs in turn."""
    pairs = [(m, t) for m in mine for t in theirs]
    thumbs = [(rid, 1) for rid in mine] + [(rid, -1) for rid in theirs]
    bodies: list[dict[str, Any]] = []
    routes = ("comparison", "ranking", "thumbs")
    made = {route: 0 for route in routes}
    while len(bodies) < judgments:
        before = len(bodies)
        for route in routes:
            n = made[route]
            if len(bodies) >= judgments:
                break
            if route == "comparison" and n < len(pairs):
                m, t = pairs[n]
                bodies.append({"kind": "comparison", "response_ids": [m, t], "winner": "a"})
            elif route == "ranking" and n < len(pairs):
                m, t = pairs[-1 - n]
                bodies.append({"kind": "ranking", "response_ids": [m, t]})
            elif route == "thumbs" and n < len(thumbs):
                rid, value = thumbs[n]
                bodies.append({"kind": "thumbs", "response_id": rid, "value": value})
            else:
                continue
            made[route] += 1
        if len(bodies) == before:  # every item used: a repeat would only replace a vote
            break
    return bodies
