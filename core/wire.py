"""Records as JSON and back, for what travels between tuneloop's own processes: a gateway sends
the responses and feedback it took to the process that owns the store (`serve.gateway_api`).
Every field is rebuilt with its type; what the store then checks (`feedback.validation`) is
checked there as for any other caller."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tuneloop.core.records import (
    FEEDBACK_KINDS,
    Feedback,
    Message,
    Ranking,
    Response,
    SamplingParams,
)

_FEEDBACK_BY_KIND = {kind: cls for cls, kind in FEEDBACK_KINDS.items()}


class WireError(ValueError):
    """A record that is not one tuneloop sends."""


def response_to_wire(response: Response) -> dict[str, Any]:
    return asdict(response)


def response_from_wire(data: dict[str, Any]) -> Response:
    try:
        fields = dict(data)
        fields["prompt"] = tuple(Message(m["role"], m["content"]) for m in data["prompt"])
        fields["params"] = SamplingParams(**data["params"])
        return Response(**fields)
    except (KeyError, TypeError) as exc:
        raise WireError(f"not a response: {exc}") from exc


def feedback_to_wire(fb: Feedback) -> dict[str, Any]:
    return {"kind": FEEDBACK_KINDS[type(fb)], **asdict(fb)}


def feedback_from_wire(data: dict[str, Any]) -> Feedback:
    fields = dict(data)
    cls = _FEEDBACK_BY_KIND.get(fields.pop("kind", None))
    if cls is None:
        raise WireError(f"not a feedback kind: {data.get('kind')!r}")
    if cls is Ranking and "response_ids" in fields:
        fields["response_ids"] = tuple(fields["response_ids"])
    try:
        return cls(**fields)
    except TypeError as exc:
        raise WireError(f"not a {cls.__name__.lower()}: {exc}") from exc
