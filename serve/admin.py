"""Operator routes under `/v1/admin/`, guarded by the bearer token the server writes to its data
dir at start. The CLI uses them while a server owns the database file. Errors are answered in
one shape, with the statuses of `serve.errors`.

- `POST /snapshot`, `GET /versions`, `GET /runs`, `GET /loop` (what trains, what serves)
- `POST /train {"kind", "overrides"?, "full"?}`: start a cycle now (409 while one runs)
- `POST /import {"path", "rater"?, "limit"?}`: load a preference file as comparisons
- `POST /promote {"version"}`, `POST /rollback`: hot-swap the served policy, then record it
"""

from __future__ import annotations

import hmac
import typing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool

from tuneloop.core.config import DataDir
from tuneloop.core.records import to_json_dict
from tuneloop.core.settings import (
    DEFAULT_POLICY_JOB,
    JOBS,
    GateSettings,
    JobSettings,
    options,
    parse_overrides,
)
from tuneloop.feedback.registry import list_versions
from tuneloop.feedback.runs import list_runs
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.loop.control import LoopControl
from tuneloop.serve.chat_service import ChatService


class _TrainFields(BaseModel):
    kind: Literal[JOBS] = DEFAULT_POLICY_JOB  # type: ignore[valid-type]
    overrides: list[str] = Field(default_factory=list, description="TRL config `key=value`s")
    full: bool = False
    config_file: str | None = Field(None, description="a YAML/JSON file of TRL config fields")
    seed: int = 0
    reward_overrides: list[str] = Field(
        default_factory=list, description="for the reward model retrained in the same cycle"
    )
    keep_reward: bool = Field(False, description="gate with the current reward model")
    gate: bool = Field(True, description="false: leave the policy a candidate")


def _optional_options(settings_class: type) -> dict[str, Any]:
    """The exposed fields of a settings dataclass as optional request fields (None: the
    server's own setting), so that a new option shows up here without a change."""
    hints = typing.get_type_hints(settings_class)
    return {
        key: (
            hints[f.name] | None,
            Field(None, description=f"{f.metadata['help']} (default: the server's)"),
        )
        for key, f in options(settings_class)
    }


# `POST /v1/admin/train`'s body: the cycle, then the gate's options (`GateSettings`).
TrainIn = create_model("TrainIn", __base__=_TrainFields, **_optional_options(GateSettings))


class PromoteIn(BaseModel):
    version: str


class ImportIn(BaseModel):
    path: str = Field(description="a preference file on the server's machine")
    rater: str = "import"
    limit: int | None = None


def create_admin_router(
    service: ChatService, control: LoopControl, data_dir: DataDir, token: str
) -> APIRouter:
    async def authorize(authorization: str = Header("")) -> None:
        # async: a plain `def` dependency costs every admin request a hop to a worker thread,
        # which took ~0.1 s under 8 streams on 2 cores beside vLLM (bench/hot_swap.py).
        given = authorization.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                f"admin routes need 'Authorization: Bearer <token>'; the "
                f"token is in {data_dir.admin_token_file}",
            )

    router = APIRouter(prefix="/v1/admin", dependencies=[Depends(authorize)])

    @router.post("/snapshot")
    async def snapshot() -> dict[str, Any]:
        snap = await run_in_threadpool(create_snapshot, service.store, data_dir.snapshots)
        return {"id": snap.id, "path": str(snap.path), "manifest": snap.manifest}

    @router.get("/versions")
    async def versions() -> list[dict[str, Any]]:
        return [to_json_dict(v) for v in await run_in_threadpool(list_versions, service.store)]

    @router.get("/runs")
    async def runs(limit: int = 50) -> list[dict[str, Any]]:
        return [to_json_dict(r) for r in await run_in_threadpool(list_runs, service.store, limit)]

    @router.get("/loop")
    async def loop() -> dict[str, Any]:
        return await run_in_threadpool(control.status)

    @router.post("/train", status_code=202)
    async def train(body: TrainIn) -> dict[str, Any]:  # type: ignore[valid-type]
        overrides, reward_overrides = (
            parse_overrides(items) for items in (body.overrides, body.reward_overrides)
        )
        settings = JobSettings(
            config_file=Path(body.config_file) if body.config_file else None,
            overrides=overrides,
            full=body.full,
            seed=body.seed,
        )
        gate = control.gate
        given = {f.name: getattr(body, key) for key, f in options(GateSettings)}
        gate = replace(gate, **{name: v for name, v in given.items() if v is not None})
        control.train_now(
            body.kind,
            settings,
            reward_settings=JobSettings(overrides=reward_overrides, seed=body.seed),
            retrain_reward=not body.keep_reward,
            gate=body.gate,
            gate_settings=gate,
        )
        return {"started": body.kind}

    @router.post("/import")
    async def import_file(body: ImportIn) -> dict[str, Any]:
        from tuneloop.feedback.importer import import_preferences

        try:
            result = await run_in_threadpool(
                import_preferences, service.store, body.path, rater_id=body.rater, limit=body.limit
            )
        except OSError as exc:  # the path names no readable file on the server's machine
            raise HTTPException(422, f"cannot read {body.path}: {exc.strerror}") from exc
        return asdict(result)

    @router.post("/promote")
    async def promote(body: PromoteIn) -> dict[str, Any]:
        version = await run_in_threadpool(control.promote, body.version)
        return to_json_dict(version)

    @router.post("/rollback")
    async def rollback() -> dict[str, Any]:
        version = await run_in_threadpool(control.rollback)
        return to_json_dict(version)

    return router
