"""Operator routes of the human gate (`tuneloop.loop.canary`), under `/v1/admin/`, audited:

- `GET /canary`: the running canary with its verdict so far, and the canaries before it (each
  with `flagged`: raters who decided it and are quarantined or disabled since)
- `POST /canary {"version", "share"?, "judgments"?, "win_rate"?, "rater_share"?}`: hold a
  candidate in canary
- `POST /canary/check`: decide now if enough people judged (the loop checks every poll)
- `POST /canary/stop {"reason"?}`: end it without a decision; the version stays a candidate
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
# name types made inside the router factory.

from dataclasses import asdict, replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tuneloop.core.records import Account
from tuneloop.feedback.accounts import audit
from tuneloop.feedback.canary import flagged_raters, list_canaries
from tuneloop.feedback.store import FeedbackStore
from tuneloop.loop.control import LoopControl
from tuneloop.serve.auth import Principals


class CanaryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    share: float | None = Field(None, gt=0, le=1, description="default: the server's")
    judgments: int | None = Field(None, ge=1, description="before the human gate decides")
    win_rate: float | None = Field(None, ge=0, lt=1, description="the bar for the lower bound")
    rater_share: float | None = Field(
        None, gt=0, le=1, description="one rater's judgments count for at most this share"
    )


class StopIn(BaseModel):
    reason: str = Field("stopped by the operator", max_length=500)


def create_canary_router(control: LoopControl, principals: Principals) -> APIRouter:
    router = APIRouter(prefix="/v1/admin")
    Operator = Annotated[Account, Depends(principals.require("operator"))]  # noqa: N806

    def canaries() -> Any:
        if control.canaries is None:
            raise HTTPException(409, "this server cannot serve a canary")
        return control.canaries

    def record(account: Account, action: str, target: str, **detail: Any) -> None:
        audit(control.store, account.name, action, target, **detail)

    @router.get("/canary")
    async def status(_: Operator) -> dict[str, Any]:
        running = await run_in_threadpool(control.canary_status)
        history = await run_in_threadpool(_history, control.store)
        return {"running": running, "history": history}

    @router.post("/canary", status_code=201)
    async def start(body: CanaryIn, account: Operator) -> dict[str, Any]:
        gate = control.gate
        gate = replace(
            gate,
            human=True,
            canary_share=body.share or gate.canary_share,
            human_judgments=body.judgments or gate.human_judgments,
            human_min_win_rate=gate.human_min_win_rate if body.win_rate is None else body.win_rate,
            human_max_rater_share=body.rater_share or gate.human_max_rater_share,
        )
        canary = await run_in_threadpool(canaries().start, body.version, gate)
        await run_in_threadpool(record, account, "canary.start", body.version, share=canary.share)
        return asdict(canary)

    @router.post("/canary/check")
    async def check(account: Operator) -> dict[str, Any]:
        found = await run_in_threadpool(canaries().check)
        return {"verdict": found.to_dict() if found else None}

    @router.post("/canary/stop")
    async def stop(body: StopIn, account: Operator) -> dict[str, Any]:
        canary = await run_in_threadpool(canaries().stop, body.reason)
        await run_in_threadpool(record, account, "canary.stop", canary.version_id)
        return asdict(canary)

    return router


def _history(store: FeedbackStore) -> list[dict[str, Any]]:
    return [asdict(c) | {"flagged": flagged_raters(store, c)} for c in list_canaries(store)]
