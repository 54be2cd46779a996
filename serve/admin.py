"""Operator routes under `/v1/admin/`, guarded by the bearer token the server writes to its data
dir at start. The CLI uses them while a server owns the database file."""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException
from starlette.concurrency import run_in_threadpool

from tuneloop.config import DataDir
from tuneloop.feedback.registry import list_versions
from tuneloop.feedback.snapshot import create_snapshot
from tuneloop.serve.chat_service import ChatService


def create_admin_router(service: ChatService, data_dir: DataDir, token: str) -> APIRouter:
    def authorize(authorization: str = Header("")) -> None:
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
        rows = await run_in_threadpool(list_versions, service.store)
        return [
            asdict(v) | {"created_at": v.created_at.isoformat() if v.created_at else None}
            for v in rows
        ]

    return router
