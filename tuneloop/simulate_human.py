"""`tuneloop simulate --human-gate`: after the reward model's gate, simulated people decide.

The candidate that passed is held in canary by the server (`tuneloop.loop.canary`). Simulated
users then ask new questions through the API, and the server answers a share of the
conversations with the canary; the operator makes rating tasks from that traffic (each pits an
answer of the canary against one of the served version, blind); simulated raters fetch them from
the queue and judge them with the preference (a fraction `noise` flipped), until the human gate
has the judgments it waits for and promotes or rejects the canary.
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
) -> dict[str, Any]:
    """Traffic, tasks and judgments until the running canary is decided; its record."""
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
            return decided
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
