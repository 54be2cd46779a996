"""One mapping from errors to HTTP responses, in one shape for every route: OpenAI's
`{"error": {"message": ..., "type": ...}}`, which its official client shows. The errors of the
layers below know nothing of HTTP; the table here gives each its status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tuneloop.core.settings import SettingsError
from tuneloop.feedback.accounts import AccountError, UnknownAccountError
from tuneloop.feedback.canary import CanaryError
from tuneloop.feedback.importer import ImportFormatError
from tuneloop.feedback.registry import RegistryError, UnknownVersionError
from tuneloop.feedback.validation import FeedbackError, NotYoursError, UnknownResponseError
from tuneloop.loop.control import BusyError
from tuneloop.serve.engine import EngineLoadError, EngineUnavailableError, PromptTooLongError
from tuneloop.serve.task_queue import NoSuchTaskError


class RateLimitedError(Exception):
    """Over a per-account limit (`serve.limits`): answered 429 with `Retry-After`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


# Checked in order: a subclass before its base.
STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (RateLimitedError, 429),
    (UnknownResponseError, 404),
    (NoSuchTaskError, 404),
    (NotYoursError, 403),
    (UnknownAccountError, 404),
    (AccountError, 422),
    (UnknownVersionError, 404),
    (FeedbackError, 422),
    (SettingsError, 422),
    (ImportFormatError, 422),
    (PromptTooLongError, 400),
    (BusyError, 409),
    (CanaryError, 409),
    (RegistryError, 409),
    (EngineLoadError, 500),
    (EngineUnavailableError, 503),
)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind}}
    return JSONResponse(body, status_code=status, headers=headers)


def status_of(error: Exception) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(error, cls))


def install_error_handlers(app: FastAPI) -> None:
    """Answer the errors above, FastAPI's own (`HTTPException`, e.g. a 401) and invalid request
    bodies in the one shape."""

    async def domain(_: Request, exc: Exception) -> JSONResponse:
        return error_response(status_of(exc), str(exc), getattr(exc, "headers", None))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, describe_invalid(list(exc.errors())))

    for cls, _status in STATUS_BY_ERROR:
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(RequestValidationError, invalid)


def describe_invalid(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors in one line: `field: message; ...` (the first five)."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)
