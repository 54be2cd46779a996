"""Routes of the raters' workbench (`serve.rating_desk`).

For raters (and up):
- `GET /v1/tasks/next?kind=comparison|ranking` -> `{"task": {...} | null, "progress"}`: the task
  to judge now (the same one again until it is judged or skipped)
- `POST /v1/tasks/{id}/judgment {"winner": "a"|"b"|"tie"|"both_bad"}` or `{"ranking": [2, 0,
  1]}` (the answers' positions as shown, best first) -> 201 once stored
- `POST /v1/tasks/{id}/answers/{position} {"kind": "thumbs"|"rating"|"edit", ...}`: feedback on
  an answer of a task the caller holds, named by its position as shown
- `POST /v1/tasks/{id}/skip`

For operators, under `/v1/admin/` (each change audited):
- `POST /tasks {"source": "traffic", "limit"}` or `{"source": "prompts", "prompts": [...]}`
- `POST /tasks/score`: score the open tasks with the reward model now (the loop does it every
  poll with `--task-selection active`), and order the queue by it
- `GET /tasks` (counts), `GET /tasks/{id}` (answers with ids and versions, who judged),
  `POST /tasks/{id}/gold {"response_id"}`
- `GET /raters` (agreement, gold accuracy, quarantine), `POST /raters/quarantine`,
  `POST /raters/{name}/reinstate`
- `GET /leaderboard?rounds=1000`: the versions ranked by people
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
# name types made inside the router factories.

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tuneloop.core.records import WINNERS, Account, Edit, Feedback, Rating, Thumbs
from tuneloop.core.settings import MAX_TASK_ANSWERS, TrustSettings
from tuneloop.feedback import raters, tasks
from tuneloop.feedback.accounts import audit
from tuneloop.feedback.leaderboard import version_leaderboard
from tuneloop.feedback.validation import MAX_RANKING_SIZE, MAX_TEXT_CHARS
from tuneloop.serve.auth import Principals
from tuneloop.serve.limits import Limits, ranking_cost
from tuneloop.serve.rating_desk import RatingDesk

MAX_PROMPTS_PER_REQUEST = 1000
MAX_TASKS_PER_REQUEST = 1000


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    winner: str | None = Field(None, description=", ".join(WINNERS))
    ranking: list[int] | None = Field(
        None, max_length=MAX_RANKING_SIZE, description="the positions shown, best first"
    )


class AnswerFeedbackIn(BaseModel):
    """Thumbs (`value` 1 or -1), a rating (`value` 1-5, `reason`?) or an edit (`text`) of an
    answer of a task the caller holds. The values are checked by
    `feedback.validation.check_feedback`, as everywhere else feedback comes in."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["thumbs", "rating", "edit"]
    value: int | None = None
    reason: str | None = None
    text: str | None = None

    def record(self, rater: str) -> Callable[[int], Feedback]:
        if self.kind == "thumbs":
            return lambda rid: Thumbs(rid, self.value, rater)  # type: ignore[arg-type]
        if self.kind == "rating":
            return lambda rid: Rating(rid, self.value, self.reason, rater)  # type: ignore[arg-type]
        return lambda rid: Edit(rid, self.text, rater)  # type: ignore[arg-type]


class MakeTasksIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["traffic", "prompts"] = "traffic"
    limit: int = Field(10, ge=1, le=MAX_TASKS_PER_REQUEST, description="traffic: at most this")
    prompts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(
        default_factory=list, max_length=MAX_PROMPTS_PER_REQUEST
    )
    answers: int | None = Field(None, ge=2, le=MAX_TASK_ANSWERS)
    overlap: int | None = Field(None, ge=1, le=100)


class GoldIn(BaseModel):
    response_id: int | None = Field(description="the known best answer; null: not gold")


class QuarantineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list, description="these raters")
    below_alpha: float | None = Field(None, description="and those agreeing less than this")
    below_gold: float | None = Field(None, description="and those less accurate on gold")
    min_judgments: int = Field(20, ge=1, description="judgments before a score counts")
    reason: str = Field("", max_length=500)


def create_tasks_router(desk: RatingDesk, principals: Principals, limits: Limits) -> APIRouter:
    router = APIRouter(prefix="/v1/tasks")
    Rater = Annotated[Account, Depends(principals.require("rater"))]  # noqa: N806

    @router.get("/next")
    async def next_task(
        account: Rater, kind: Literal["comparison", "ranking"] | None = None
    ) -> dict[str, Any]:
        view = await desk.anext(account, kind)
        return {
            "task": view.to_dict() if view else None,
            "progress": desk.progress(account),
        }

    @router.post("/{task_id}/judgment", status_code=201)
    async def judgment(task_id: int, body: JudgmentIn, account: Rater) -> dict[str, Any]:
        await limits.check(limits.feedback, account, ranking_cost(len(body.ranking or ())))
        saved = desk.judge(account, task_id, winner=body.winner, ranking=body.ranking)
        row = await asyncio.wrap_future(saved)
        return {"id": row, "task_id": task_id, "progress": desk.progress(account)}

    @router.post("/{task_id}/answers/{position}", status_code=201)
    async def answer_feedback(
        task_id: int, position: int, body: AnswerFeedbackIn, account: Rater
    ) -> dict[str, Any]:
        await limits.check(limits.feedback, account)
        saved = desk.feedback_on_answer(account, task_id, position, body.record(account.name))
        return {"id": await asyncio.wrap_future(saved), "kind": body.kind}

    @router.post("/{task_id}/skip")
    async def skip(task_id: int, account: Rater) -> dict[str, Any]:
        await run_in_threadpool(desk.skip, account, task_id)
        return {"skipped": task_id, "progress": desk.progress(account)}

    return router


def create_raters_router(
    desk: RatingDesk,
    principals: Principals,
    trust: TrustSettings,
    score_tasks: Callable[[], int] = lambda: 0,
) -> APIRouter:
    """`score_tasks` scores the open tasks with the current reward model (`LoopControl`)."""
    router = APIRouter(prefix="/v1/admin")
    Operator = Annotated[Account, Depends(principals.require("operator"))]  # noqa: N806
    store = desk.service.store

    @router.post("/tasks", status_code=201)
    async def make_tasks(body: MakeTasksIn, account: Operator) -> dict[str, Any]:
        if body.source == "prompts":
            if not body.prompts:
                raise HTTPException(422, "source 'prompts' needs prompts")
            made = await run_in_threadpool(
                desk.make_from_prompts,
                body.prompts,
                account,
                answers=body.answers,
                overlap=body.overlap,
            )
        else:
            made = await run_in_threadpool(
                desk.make_from_traffic, body.limit, answers=body.answers, overlap=body.overlap
            )
        await run_in_threadpool(
            audit, store, account.name, "tasks.make", body.source, tasks=len(made)
        )
        return {"made": made}

    @router.get("/tasks")
    async def task_counts(_: Operator) -> dict[str, int]:
        return await run_in_threadpool(tasks.task_counts, store)

    @router.post("/tasks/score")
    async def score(_: Operator) -> dict[str, Any]:
        scored = await run_in_threadpool(score_tasks)
        ordered = await run_in_threadpool(desk.follow_scores)
        return {"scored": scored, "selection": desk.settings.selection, "reordered": ordered}

    @router.get("/tasks/{task_id}")
    async def task_detail(task_id: int, _: Operator) -> dict[str, Any]:
        found = await run_in_threadpool(tasks.task_detail, store, task_id)
        if found is None:
            raise HTTPException(404, f"no task {task_id}")
        return found

    @router.post("/tasks/{task_id}/gold")
    async def gold(task_id: int, body: GoldIn, account: Operator) -> dict[str, Any]:
        try:
            await run_in_threadpool(
                tasks.set_gold, store, task_id, body.response_id, actor=account.name
            )
        except KeyError as exc:
            raise HTTPException(404, f"no task {task_id}") from exc
        await run_in_threadpool(desk.queue.reload)
        return {"task_id": task_id, "gold_response_id": body.response_id}

    @router.get("/raters")
    async def rater_report(_: Operator) -> dict[str, Any]:
        report = await run_in_threadpool(raters.rater_report, store)
        # The trust weight training gives each one's judgments (1: a user's own, an import).
        weights = await run_in_threadpool(raters.rater_weights, store)
        return {
            "alpha": report.alpha,
            "raters": [
                asdict(r)
                | {
                    "gold_accuracy": r.gold_accuracy,
                    "weight": weights[r.name].weight if r.name in weights else 1.0,
                }
                for r in report.raters
            ],
            "pairs": [asdict(p) for p in report.pairs],
        }

    @router.post("/raters/quarantine")
    async def quarantine(body: QuarantineIn, account: Operator) -> dict[str, Any]:
        names = list(body.names)
        if body.below_alpha is not None or body.below_gold is not None:
            report = await run_in_threadpool(raters.rater_report, store)
            names += raters.below(
                report,
                alpha=body.below_alpha,
                gold_accuracy=body.below_gold,
                min_judgments=body.min_judgments,
            )
        held = await run_in_threadpool(
            desk.quarantine, sorted(set(names)), body.reason, actor=account.name
        )
        return {"quarantined": held}

    @router.post("/raters/{name}/reinstate")
    async def reinstate(name: str, account: Operator) -> dict[str, Any]:
        if not await run_in_threadpool(desk.reinstate, name, actor=account.name):
            raise HTTPException(404, f"{name} is not quarantined")
        return {"reinstated": name}

    @router.get("/leaderboard")
    async def leaderboard(_: Operator, rounds: int = 1000) -> list[dict[str, Any]]:
        if not 10 <= rounds <= 10_000:
            raise HTTPException(422, "rounds is 10 to 10,000")
        standings = await run_in_threadpool(version_leaderboard, store, trust, rounds=rounds)
        return [asdict(s) for s in standings]

    return router
