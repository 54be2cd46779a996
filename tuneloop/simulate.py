"""`tuneloop simulate`: the whole loop against a fresh data dir, as proof that it learns.

A real server runs (in this process, on 127.0.0.1) on the base model. Simulated users ask
questions through `POST /v1/chat/completions`, two answers per question; simulated raters compare
each pair with a preference function (a fraction `noise` of votes flipped) and send the result to
`POST /v1/feedback`. Then the operator's "train now" (`POST /v1/admin/train`) runs the cycle the
server always runs: snapshot, reward model, DPO (or RL), gate, promotion and hot-swap.

The win rate is judged with the preference itself on held-out questions that no rater saw: the
baseline's and the new version's answers, `samples` of each per question with the same sampling
settings, are scored; a question is won when the new version's mean score is higher (ties count
half). When the gate rejected the candidate, it is scored in-process with the embedded engine.
With `traffic`, the feedback is what people give instead of comparisons: sparse reactions to
conversations and raters' judgments of tasks from the queue (`tuneloop.simulate_traffic`).
With `human_gate`, a candidate that passes is held in canary and simulated people decide on live
traffic (`tuneloop.simulate_human`); `invert` trains on the opposite preference, so that people
should reject what the reward model's gate, trained on the same votes, let through.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tuneloop.core.config import DEFAULT_MAX_CONCURRENCY, DataDir, ServeConfig, VllmSettings
from tuneloop.core.settings import (
    DEFAULT_MODEL,
    DEFAULT_POLICY_JOB,
    TASK_SELECTIONS,
    GateSettings,
    LimitSettings,
    ScheduleSettings,
    SettingsError,
    TaskSettings,
    TrustSettings,
    check_job,
    setting,
    simulated_jobs,
)
from tuneloop.models import resolve_model
from tuneloop.preferences import Preference, improver, resolve
from tuneloop.remote import follow_cycle

if TYPE_CHECKING:
    from tuneloop.simulate_traffic import Traffic

RATERS = 8


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation; the fields with an option are `tuneloop simulate`'s options."""

    data_dir: Path
    preference: str = setting(
        "concise",
        "what raters prefer: concise, no_repeat, detailed, or module:function taking "
        "(prompt, response) and returning a float, higher is better",
        option="preference",
    )
    noise: float = setting(0.1, "fraction of votes flipped", option="noise")
    comparisons: int = setting(600, "pairs rated in all", option="comparisons")
    rounds: int = setting(1, "collect-train-promote rounds", option="rounds")
    heldout: int = setting(48, "questions the win rate is on", option="heldout")
    samples: int = setting(4, "answers per held-out question", option="samples")
    max_tokens: int = 48
    temperature: float = 1.0
    kind: str | None = setting(
        None,
        f"the policy job of each round (default: {DEFAULT_POLICY_JOB}; with --traffic, "
        "auto where the server has it)",
        option="kind",
        choices=simulated_jobs,
    )
    model: str = DEFAULT_MODEL
    seed: int = setting(0, "seed of questions, votes and training", option="seed")
    concurrency: int = DEFAULT_MAX_CONCURRENCY
    train_overrides: tuple[str, ...] = setting(
        (), "a field of the policy job's TRL config, KEY=VALUE (repeatable)", option="set"
    )
    min_win_rate: float = setting(
        GateSettings.min_win_rate,
        "the gate's bar: win rate against the served policy",
        option="min_win_rate",
    )
    gate_max_length_ratio: float | None = setting(
        GateSettings.max_length_ratio,
        "the gate refuses a candidate whose answers grew this many times longer than the served "
        "policy's",
        option="gate_max_length_ratio",
    )
    human_gate: bool = setting(
        False,
        "hold the candidate that passes in canary, and let simulated raters judge it on live "
        "traffic against the served version: they promote or reject it",
        option="human_gate",
    )
    invert: bool = setting(
        False,
        "the raters whose votes train the candidate prefer the opposite (a candidate people "
        "should reject)",
        option="invert",
    )
    human_judgments: int = setting(
        100, "judgments the human gate waits for", option="human_judgments"
    )
    gate_attacker: int = setting(
        0,
        "with --human-gate: one plain account also sends this many judgments for the candidate "
        "through every route a user has (they must not count)",
        option="gate_attacker",
    )
    canary_share: float = setting(
        GateSettings.canary_share, "the share of conversations the canary answers",
        option="canary_share",
    )  # fmt: skip
    traffic: int = setting(
        0,
        "conversations simulated users hold, reacting to some answers as people do, instead of "
        "--comparisons (0: comparisons)",
        option="traffic",
    )
    user_feedback: float = setting(
        0.15,
        "with --traffic: the share of answers a user reacts to (a thumb mostly; a regenerate, "
        "a rating, an edit)",
        option="user_feedback",
    )
    raters: int = setting(6, "with --traffic: raters taking tasks from the queue", option="raters")
    judgments: int = setting(
        0,
        "with --traffic: the raters' judgments of tasks the operator makes from the traffic",
        option="judgments",
    )
    bad_raters: float = setting(
        0.0,
        "with --traffic: the share of raters who vote at random or against the preference "
        "(half each)",
        option="bad_raters",
    )
    task_selection: str = setting(
        TaskSettings.selection,
        "with --traffic: which tasks raters get first: oldest, random, or active (those a "
        "reward model trained on the feedback so far is least sure of)",
        option="task_selection",
        choices=lambda: TASK_SELECTIONS,
    )
    rater_weights: bool = setting(
        True,
        "weigh raters' judgments by their trust, and quarantine those under half "
        "(--no-rater-weights: the unweighted loop)",
        option="rater_weights",
        flag="--no-rater-weights",
    )
    engine: str = "embedded"
    vllm: VllmSettings = field(default_factory=VllmSettings)
    log: Callable[[str], None] = field(
        default=lambda msg: print(f"simulate: {msg}", file=sys.stderr, flush=True)
    )

    def __post_init__(self) -> None:
        if self.kind is None:
            auto = self.traffic > 0 and "auto" in simulated_jobs()
            object.__setattr__(self, "kind", "auto" if auto else DEFAULT_POLICY_JOB)
        check_job(self.kind, simulated_jobs)
        counted = min(self.traffic, self.judgments, self.raters) >= 0
        if not counted or not all(0 <= s <= 1 for s in (self.user_feedback, self.bad_raters)):
            raise SettingsError("traffic, judgments and raters are counts, and shares are 0 to 1")
        object.__setattr__(self, "train_overrides", tuple(self.train_overrides))


@dataclass
class _Client:
    """The API as the simulated people use it, each with an account of their own (made on
    first use by the first admin, whose token the server wrote to the data dir)."""

    http: httpx.Client
    token: str
    tokens: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def signed_in(self, name: str, role: str) -> dict[str, str]:
        with self.lock:
            if name not in self.tokens:
                made = self.admin("POST", "users", {"name": name, "role": role})
                self.tokens[name] = made["token"]
            return {"Authorization": f"Bearer {self.tokens[name]}"}

    def chat(self, prompt: str, max_tokens: int, temperature: float, user: str) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        headers = self.signed_in(user, "user")
        resp = self.http.post("/v1/chat/completions", json=body, headers=headers)
        resp.raise_for_status()
        return resp.json()

    def feedback(self, body: dict[str, Any], rater: str) -> None:
        headers = self.signed_in(rater, "rater")
        self.http.post("/v1/feedback", json=body, headers=headers).raise_for_status()

    def signed_in_admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def admin(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        resp = self.http.request(
            method, f"/v1/admin/{route}", json=body, headers=self.signed_in_admin()
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"{route}: {resp.status_code} {resp.text}")
        return resp.json()


def run_simulation(config: SimulationConfig) -> dict[str, Any]:
    """Run the loop; the summary `tuneloop simulate` prints as its last line."""
    from tuneloop.feedback.store import FEEDBACK_TABLES  # imports duckdb: not at `--help`

    started = time.perf_counter()
    preference = resolve(config.preference)
    taught = _opposite(preference) if config.invert else preference
    dd = DataDir(config.data_dir)
    if dd.db.exists():
        raise ValueError(f"{dd.root} already holds a database: simulate wants a fresh data dir")
    model = resolve_model(config.model, log=config.log)
    heldout, train = _prompts(config, model)
    rng = random.Random(config.seed)
    stages = _Stopwatch()
    with _server(dd, model, config) as client:
        baseline = client.admin("GET", "loop")["served_version"]
        config.log(f"baseline {baseline}; sampling held-out answers")
        with stages("baseline_answers"):
            # From an engine of its own: asked through the server, the held-out questions
            # would be traffic that the jobs sampling on people's prompts learn on.
            before = _answers_in_process(baseline, _artifact(client, baseline), heldout, config)
        traffic = _traffic(client, train, taught, before, heldout, config, rng)
        cycle: dict[str, Any] = {}
        per_round = -(-config.comparisons // config.rounds)
        for round_no in range(config.rounds):
            if traffic is not None:
                config.log(f"round {round_no + 1}: traffic, then judgments")
                with stages("traffic"):
                    traffic.converse(round_no)
                with stages("judgments"):
                    traffic.rate(round_no)
            else:
                batch = [train[(round_no * per_round + i) % len(train)] for i in range(per_round)]
                config.log(f"round {round_no + 1}: {len(batch)} comparisons")
                with stages("collect"):
                    _collect(client, batch, taught, config, rng)
            with stages("cycle"):
                cycle = _train(client, config)
            config.log(f"round {round_no + 1}: {cycle.get('reason') or cycle.get('error')}")
        if cycle.get("status") != "done":
            raise RuntimeError(f"the training cycle failed: {cycle.get('error')}")
        new_version = cycle["candidate_version"]
        human: dict[str, Any] | None = None
        if cycle.get("canary"):
            with stages("human_gate"):
                human = _human_gate(client, train[::-1], preference, config, rng)
        promoted = bool(cycle["promoted"]) or (human or {}).get("status") == "promoted"
        with stages("new_answers"):
            if promoted:
                after = _answers(client, heldout, config)
            else:
                artifact = _artifact(client, new_version)
                after = _answers_in_process(new_version, artifact, heldout, config)
        counts = client.http.get("/v1/feedback/stats", headers=client.signed_in_admin()).json()
        job_seconds = _job_seconds(client.admin("GET", "runs?limit=1000"))
        rows = {kind: counts[kind] for kind in FEEDBACK_TABLES}
        added = traffic.summary(rows) if traffic is not None else {}
    wins = _win_rate(before, after, heldout, preference)
    return added | {
        "preference": config.preference,
        "noise": config.noise,
        "comparisons": config.comparisons,
        "heldout_prompts": len(heldout),
        "win_rate": round(wins["win_rate"], 4),
        "win_rate_ci": [round(wins["ci_low"], 4), round(wins["ci_high"], 4)],
        "baseline_mean_score": round(wins["baseline_mean"], 4),
        "new_mean_score": round(wins["new_mean"], 4),
        "baseline_version": baseline,
        "new_version": new_version,
        "promoted": promoted,
        "gate": cycle.get("gate", {}),
        "human_gate": human,
        "feedback_rows": sum(counts[kind] for kind in FEEDBACK_TABLES),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_stage": stages.seconds | job_seconds,
    }


def _traffic(
    client: _Client,
    questions: list[str],
    preference: Preference,
    before: list[list[str]],
    heldout: list[str],
    config: SimulationConfig,
    rng: random.Random,
) -> Traffic | None:
    """Traffic mode's people (`tuneloop.simulate_traffic`), or None for comparisons. Users
    place an answer among the baseline's held-out answers (only their scores, never the
    questions, reach them)."""
    if config.traffic <= 0:
        return None
    from tuneloop.simulate_traffic import Traffic

    scores = [preference(q, t) for q, texts in zip(heldout, before, strict=True) for t in texts]
    improve = None if config.invert else improver(config.preference)
    return Traffic(client, questions, preference, improve, config, scores, rng)


def _opposite(preference: Preference) -> Preference:
    return lambda prompt, response: -preference(prompt, response)


def _human_gate(
    client: _Client,
    questions: list[str],
    preference: Preference,
    config: SimulationConfig,
    rng: random.Random,
) -> dict[str, Any]:
    """The canary judged by simulated people (`tuneloop.simulate_human`); its outcome."""
    from tuneloop.simulate_human import judge_canary

    decided = judge_canary(
        client,
        questions,
        preference,
        noise=config.noise,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        concurrency=config.concurrency,
        rng=rng,
        log=config.log,
        attacker=config.gate_attacker,
    )
    attack = {"attack": decided["attack"]} if "attack" in decided else {}
    return {"status": decided["status"], **(decided["result"] or {}), **attack}


class _Stopwatch:
    """Seconds spent per named stage, summed over the times a stage is entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + spent, 1)


def _job_seconds(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Wall seconds of the cycles' jobs by kind (`job_rm`, `job_dpo`, `job_gate`, ...): where a
    cycle's time went. The rest of a cycle is the snapshot and promotion with its hot-swap."""
    totals: dict[str, float] = {}
    for run in runs:
        if run["finished_at"] is None:
            continue
        ended, began = (datetime.fromisoformat(run[k]) for k in ("finished_at", "started_at"))
        spent = (ended - began).total_seconds()
        key = f"job_{run['kind']}"
        totals[key] = round(totals.get(key, 0.0) + spent, 1)
    return totals


def _prompts(config: SimulationConfig, model: str) -> tuple[list[str], list[str]]:
    """Held-out questions (never rated) and the questions users ask for feedback: MT-bench's
    first turns that leave room for an answer in the model's context, and questions like the
    demo model's training dialogues."""
    from importlib.resources import files

    from tuneloop.core.artifacts import base_model_path, load_tokenizer
    from tuneloop.train.demo_model import demo_questions

    mt_bench = files("tuneloop.train") / "data" / "mt-bench-questions.jsonl"
    questions = [json.loads(line)["turns"][0] for line in mt_bench.read_text().splitlines()]
    from transformers import AutoConfig

    tokenizer = load_tokenizer(model)
    context = AutoConfig.from_pretrained(base_model_path(model)).max_position_embeddings
    room = min(int(tokenizer.model_max_length), int(context)) - config.max_tokens

    def fits(question: str) -> bool:
        chat = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        return len(ids) <= room

    questions = [q for q in questions if fits(q)]
    wanted = max(config.comparisons, config.traffic) + config.heldout
    questions += demo_questions(wanted, seed=config.seed)
    random.Random(config.seed).shuffle(questions)
    return questions[: config.heldout], questions[config.heldout :]


@contextmanager
def _server(dd: DataDir, model: str, config: SimulationConfig) -> Iterator[_Client]:
    from tuneloop.serve.server import server_in_thread

    serve = ServeConfig(
        dd,
        model=model,
        engine=config.engine,
        vllm=config.vllm,
        port=0,
        ui=False,
        max_concurrency=config.concurrency,
        schedule=ScheduleSettings(kind=config.kind),
        gate=GateSettings(
            min_win_rate=config.min_win_rate,
            max_length_ratio=config.gate_max_length_ratio,
            human=config.human_gate,
            canary_share=config.canary_share,
            human_judgments=config.human_judgments,
        ),
        # Simulated people ask and vote far faster than the limits a person gets.
        limits=LimitSettings(feedback_per_minute=0, chats_per_minute=0),
        # The simulation asks for the answers it judges.
        tasks=TaskSettings(backlog=0, selection=config.task_selection),
        trust=TrustSettings(rater_weights=config.rater_weights),
    )
    with server_in_thread(serve, lambda _: model, stop_timeout=120) as url:
        token = dd.admin_token_file.read_text().strip()
        with httpx.Client(base_url=url, timeout=600) as http:
            yield _Client(http, token)


def _answers(client: _Client, prompts: list[str], config: SimulationConfig) -> list[list[str]]:
    """`samples` answers per prompt through the API."""

    def ask(prompt: str) -> str:
        reply = client.chat(prompt, config.max_tokens, config.temperature, "sim-eval")
        return reply["choices"][0]["message"]["content"]

    return _sample(ask, prompts, config)


def _artifact(client: _Client, version_id: str) -> str:
    versions = client.admin("GET", "versions")
    return next(v["artifact_path"] for v in versions if v["id"] == version_id)


def _answers_in_process(
    version_id: str, artifact: str, prompts: list[str], config: SimulationConfig
) -> list[list[str]]:
    """Answers from an engine of its own: the baseline's before any traffic, and a candidate's
    the gate rejected (it is not served)."""
    from tuneloop.core.records import Message, SamplingParams
    from tuneloop.serve.engine import EmbeddedEngine

    engine = EmbeddedEngine(artifact, version_id, max_concurrency=config.concurrency)
    params = SamplingParams(config.max_tokens, config.temperature)
    return _sample(
        lambda prompt: "".join(engine.stream([Message("user", prompt)], params)), prompts, config
    )


def _sample(
    ask: Callable[[str], str], prompts: list[str], config: SimulationConfig
) -> list[list[str]]:
    """`config.samples` answers of `ask` per prompt, `config.concurrency` at a time."""
    n = config.samples
    with ThreadPoolExecutor(config.concurrency) as pool:
        flat = list(pool.map(lambda i: ask(prompts[i // n]), range(len(prompts) * n)))
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def _collect(
    client: _Client,
    prompts: list[str],
    preference: Preference,
    config: SimulationConfig,
    rng: random.Random,
) -> None:
    """Two answers per prompt, compared by a simulated rater."""
    flips = [rng.random() < config.noise for _ in prompts]

    def one(i: int) -> None:
        prompt, user = prompts[i], f"sim-user-{i % 50}"
        a = client.chat(prompt, config.max_tokens, config.temperature, user)
        b = client.chat(prompt, config.max_tokens, config.temperature, user)
        score_a = preference(prompt, a["choices"][0]["message"]["content"])
        score_b = preference(prompt, b["choices"][0]["message"]["content"])
        winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
        if flips[i] and winner != "tie":
            winner = "b" if winner == "a" else "a"
        client.feedback(
            {"kind": "comparison", "response_ids": [int(a["id"]), int(b["id"])], "winner": winner},
            rater=f"sim-rater-{i % RATERS}",
        )

    with ThreadPoolExecutor(config.concurrency) as pool:
        list(pool.map(one, range(len(prompts))))


def _train(client: _Client, config: SimulationConfig) -> dict[str, Any]:
    client.admin("POST", "train", {"kind": config.kind, "overrides": list(config.train_overrides)})
    return follow_cycle(
        lambda route: client.admin("GET", route.removeprefix("/v1/admin/")), config.log
    )


def _win_rate(
    before: list[list[str]], after: list[list[str]], prompts: list[str], preference: Preference
) -> dict[str, float]:
    from tuneloop.train.gate import wilson_interval

    won = 0.0
    base_scores, new_scores = [], []
    for prompt, old, new in zip(prompts, before, after, strict=True):
        old_mean = statistics.fmean(preference(prompt, t) for t in old)
        new_mean = statistics.fmean(preference(prompt, t) for t in new)
        base_scores.append(old_mean)
        new_scores.append(new_mean)
        won += 1.0 if new_mean > old_mean else 0.5 if new_mean == old_mean else 0.0
    low, high = wilson_interval(won, len(prompts))
    return {
        "win_rate": won / len(prompts),
        "ci_low": low,
        "ci_high": high,
        "baseline_mean": statistics.fmean(base_scores),
        "new_mean": statistics.fmean(new_scores),
    }
