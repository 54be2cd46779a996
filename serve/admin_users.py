"""Account routes under `/v1/admin/users`, for admins only (`tuneloop users` uses them while a
server owns the database file). Each change is audited and reloads the server's tokens, so a
disabled account or a replaced token stops working at once.

- `GET /users`; `POST /users {"name", "role"}` -> the account and its token (shown once)
- `POST /users/{name}/disable`, `/enable`, `/token` (a new token), `/role {"role"}`
- `POST /users/{name}/trust`, `/distrust` (operators too): whether a user's edits may become
  training targets (`TrustSettings.edits`)
- `POST /users/{name}/forget`: delete the person's data everywhere (`feedback.forget`)
- `GET /audit?limit=100&actor=&action=&since=`: the audit log, newest first; only one
  account's rows, one action's, those since an ISO date or datetime (UTC without a zone)
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
# name types made inside the router factories (the signed-in account's role, the train request).

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tuneloop.core.records import Account, to_json_dict
from tuneloop.feedback import accounts
from tuneloop.feedback.store import FeedbackStore
from tuneloop.serve.auth import Principals

_SINCE_HELP = "only rows made at or after this ISO date or datetime (UTC without a zone)"


class NewAccount(BaseModel):
    name: str
    role: str = "user"


class RoleIn(BaseModel):
    role: str


def create_users_router(
    store: FeedbackStore, principals: Principals, on_forget: Callable[[], None] = lambda: None
) -> APIRouter:
    router = APIRouter(prefix="/v1/admin")
    Admin = Annotated[Account, Depends(principals.require("admin"))]  # noqa: N806
    Operator = Annotated[Account, Depends(principals.require("operator"))]  # noqa: N806

    async def change(fn: Callable[[], Any]) -> Any:
        result = await run_in_threadpool(fn)
        await run_in_threadpool(principals.reload)
        return result

    @router.get("/users")
    async def list_users(_: Admin) -> list[dict[str, Any]]:
        return [to_json_dict(a) for a in await run_in_threadpool(accounts.list_accounts, store)]

    @router.post("/users", status_code=201)
    async def add_user(body: NewAccount, admin: Admin) -> dict[str, Any]:
        account, token = await change(
            lambda: accounts.add_account(store, body.name, body.role, actor=admin.name)
        )
        return {**to_json_dict(account), "token": token}

    @router.post("/users/{name}/disable")
    async def disable(name: str, admin: Admin) -> dict[str, Any]:
        return to_json_dict(
            await change(lambda: accounts.set_disabled(store, name, True, actor=admin.name))
        )

    @router.post("/users/{name}/enable")
    async def enable(name: str, admin: Admin) -> dict[str, Any]:
        return to_json_dict(
            await change(lambda: accounts.set_disabled(store, name, False, actor=admin.name))
        )

    @router.post("/users/{name}/token")
    async def token(name: str, admin: Admin) -> dict[str, Any]:
        new = await change(lambda: accounts.rotate_token(store, name, actor=admin.name))
        return {"name": name, "token": new}

    @router.post("/users/{name}/role")
    async def role(name: str, body: RoleIn, admin: Admin) -> dict[str, Any]:
        return to_json_dict(
            await change(lambda: accounts.set_role(store, name, body.role, actor=admin.name))
        )

    @router.post("/users/{name}/trust")
    async def trust(name: str, operator: Operator) -> dict[str, Any]:
        return to_json_dict(
            await change(lambda: accounts.set_trusted(store, name, True, actor=operator.name))
        )

    @router.post("/users/{name}/distrust")
    async def distrust(name: str, operator: Operator) -> dict[str, Any]:
        return to_json_dict(
            await change(lambda: accounts.set_trusted(store, name, False, actor=operator.name))
        )

    @router.post("/users/{name}/forget")
    async def forget_user(name: str, admin: Admin) -> dict[str, Any]:
        from tuneloop.feedback.forget import forget

        forgotten = await change(lambda: forget(store, name, actor=admin.name))
        await run_in_threadpool(on_forget)  # their tasks left the database
        return asdict(forgotten)

    @router.get("/audit")
    async def audit(
        _: Admin,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        actor: Annotated[str | None, Query(description="only this account's rows")] = None,
        action: Annotated[str | None, Query(description="only this action's rows")] = None,
        since: Annotated[str | None, Query(description=_SINCE_HELP)] = None,
    ) -> list[dict[str, Any]]:
        try:
            start = None if since is None else accounts.parse_since(since)
        except accounts.AuditQueryError as exc:
            raise HTTPException(422, f"since: {exc}") from exc
        return await run_in_threadpool(
            lambda: accounts.audit_log(store, limit, actor=actor, action=action, since=start)
        )

    return router
