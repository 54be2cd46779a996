"""Operator routes under `/v1/admin/`, for accounts with the operator role (or admin), every
change audited under the caller's name. The CLI uses them while a server owns the database file.
Errors are answered in one shape, with the statuses of `serve.errors`.

- `POST /snapshot`, `GET /versions`, `GET /runs`, `GET /loop` (what trains, what serves)
- `GET /engine`: the served version and canary, and each vLLM replica (up, answers outstanding,
  answers by version)
- `POST /train {"kind", "overrides"?, "full"?}`: start a cycle now (409 while one runs)
- `POST /import {"path", "rater"?, "limit"?}`: load a preference file as comparisons
- `POST /promote {"version"}`, `POST /rollback`: hot-swap the served policy, then record it
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
# name types made inside the router factories (the signed-in account's role, the train request).

import typing
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool

from tuneloop.core.config import DataDir
from tuneloop.core.records import Account, to_json_dict
from tuneloop.core.settings import CycleSettings, GateSettings, choices, options
from tuneloop.feedback import accounts
from tuneloop.feedback.registry import list_versions
from tuneloop.feedback.runs import list_runs
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.loop.control import LoopControl
from tuneloop.serve.auth import Principals
from tuneloop.serve.chat_service import ChatService


def train_request() -> type[BaseModel]:
    """`POST /v1/admin/train`'s body: the cycle (`CycleSettings`), then the gate's options
    (`GateSettings`, None: the server's own), so that a new setting or job kind shows up here
    without a change."""
    fields = {**request_fields(CycleSettings), **request_fields(GateSettings, optional=True)}
    return create_model("TrainIn", **fields)


def request_fields(settings_class: type, *, optional: bool = False) -> dict[str, Any]:
    """The exposed fields of a settings dataclass as request fields: with their defaults, or
    `optional` (None: the server's own setting)."""
    hints = typing.get_type_hints(settings_class)
    fields: dict[str, Any] = {}
    for key, f in options(settings_class):
        allowed = choices(f)
        hint = Literal[allowed] if allowed else hints[f.name]  # type: ignore[valid-type]
        if optional:
            described = f"{f.metadata['help']} (default: the server's)"
            fields[key] = (hint | None, Field(None, description=described))
        else:
            fields[key] = (hint, Field(f.default, description=f.metadata["help"]))
    return fields


class PromoteIn(BaseModel):
    version: str
    force: bool = Field(False, description="serve a version that was rejected, all the same")


class ImportIn(BaseModel):
    path: str = Field(description="a preference file in the data dir (or an --allow-files one)")
    limit: int | None = Field(None, ge=1, description="at most this many rows")


def create_admin_router(
    service: ChatService,
    control: LoopControl,
    data_dir: DataDir,
    principals: Principals,
    file_dirs: Sequence[Path] = (),
) -> APIRouter:
    """The operator routes; each takes an operator's (or an admin's) token, and each change is
    written to the audit log under the caller's name. Files named in a request (imports,
    training configs) are read only inside the data dir and `file_dirs`."""
    router = APIRouter(prefix="/v1/admin")
    Operator = Annotated[Account, Depends(principals.require("operator"))]  # noqa: N806
    readable_dirs = [Path(d).resolve() for d in (data_dir.root, *file_dirs)]

    def readable(path: str) -> str:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(d) for d in readable_dirs):
            raise HTTPException(
                422,
                f"{path} is outside the folders this server reads files from "
                f"({', '.join(map(str, readable_dirs))}): copy it into {data_dir.inbox}, or "
                "start the server with --allow-files DIR",
            )
        return str(resolved)

    def audit(account: Account, action: str, target: str | None, **detail: Any) -> None:
        accounts.audit(service.store, account.name, action, target, **detail)

    @router.post("/snapshot")
    async def snapshot(account: Operator) -> dict[str, Any]:
        snap = await run_in_threadpool(
            create_snapshot, service.store, data_dir.snapshots, control.trust
        )
        await run_in_threadpool(audit, account, "snapshot", snap.id)
        return {"id": snap.id, "path": str(snap.path), "manifest": snap.manifest}

    @router.get("/versions")
    async def versions(_: Operator) -> list[dict[str, Any]]:
        return [to_json_dict(v) for v in await run_in_threadpool(list_versions, service.store)]

    @router.get("/runs")
    async def runs(
        _: Operator, limit: Annotated[int, Query(ge=1, le=10_000)] = 50
    ) -> list[dict[str, Any]]:
        return [to_json_dict(r) for r in await run_in_threadpool(list_runs, service.store, limit)]

    @router.get("/loop")
    async def loop(_: Operator) -> dict[str, Any]:
        return await run_in_threadpool(control.status)

    @router.get("/engine")
    async def engine(_: Operator) -> dict[str, Any]:
        """The served version, the canary's, and each vLLM replica's state (one row for an
        engine that has no replicas)."""
        served = service.engine
        replicas = getattr(served, "replicas", None)
        rows = replicas() if replicas else [{"replica": 0, "up": served.ready}]
        return {"version": service.version, "canary": service.canary_version, "replicas": rows}

    train_in = train_request()

    @router.post("/train", status_code=202)
    async def train(body: train_in, account: Operator) -> dict[str, Any]:  # type: ignore[valid-type]
        given = body.model_dump()  # type: ignore[attr-defined]
        # Files named in the request are read only inside the allowed folders.
        for key in ("config_file", "gate_prompt_file", "accelerate_config"):
            if given[key] is not None:
                given[key] = Path(readable(str(given[key])))
        cycle = CycleSettings(**{f.name: given[key] for key, f in options(CycleSettings)})
        gate = replace(
            control.gate,
            **{f.name: given[key] for key, f in options(GateSettings) if given[key] is not None},
        )
        control.train_now(
            cycle.kind,
            cycle.job_settings(),
            reward_settings=cycle.reward_settings(),
            retrain_reward=not cycle.keep_reward,
            gate=cycle.gate,
            gate_settings=gate,
        )
        await run_in_threadpool(audit, account, "train", cycle.kind, **given)
        return {"started": cycle.kind}

    @router.post("/import")
    async def import_file(body: ImportIn, account: Operator) -> dict[str, Any]:
        from tuneloop.feedback.importer import import_preferences

        path = readable(body.path)
        try:
            result = await run_in_threadpool(
                import_preferences, service.store, path, limit=body.limit
            )
        except OSError as exc:  # the path names no readable file on the server's machine
            raise HTTPException(422, f"cannot read {body.path}: {exc.strerror}") from exc
        await run_in_threadpool(audit, account, "import", body.path, **asdict(result))
        return asdict(result)

    @router.post("/promote")
    async def promote(body: PromoteIn, account: Operator) -> dict[str, Any]:
        reason = f"promoted by {account.name}" + (" (forced)" if body.force else "")
        version = await run_in_threadpool(
            lambda: control.promote(body.version, reason, force=body.force)
        )
        await run_in_threadpool(audit, account, "promote", version.id, force=body.force)
        return to_json_dict(version)

    @router.post("/rollback")
    async def rollback(account: Operator) -> dict[str, Any]:
        version = await run_in_threadpool(control.rollback, f"rolled back by {account.name}")
        await run_in_threadpool(audit, account, "rollback", version.id)
        return to_json_dict(version)

    return router
