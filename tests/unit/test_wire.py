"""Records as they travel from a gateway to the primary: each comes back as it went."""

from __future__ import annotations

import pytest

from tuneloop.core.records import (
    Comparison,
    Edit,
    Message,
    Ranking,
    Rating,
    Response,
    SamplingParams,
    Thumbs,
)
from tuneloop.core.wire import (
    WireError,
    feedback_from_wire,
    feedback_to_wire,
    response_from_wire,
    response_to_wire,
)


def test_every_record_comes_back_as_it_went() -> None:
    feedback = [
        Thumbs(1, -1, "ann"),
        Rating(2, 5, "clear", "ann"),
        Edit(3, "better", "ann"),
        Comparison(4, 5, "tie", "bo"),
        Ranking((6, 7, 8), "bo"),
    ]
    for fb in feedback:
        assert feedback_from_wire(feedback_to_wire(fb)) == fb
    response = Response(
        9, 3, (Message("user", "hi"),), "hello", "policy-v2", SamplingParams(8, 0.0), 4, 2, 1.5
    )
    assert response_from_wire(response_to_wire(response)) == response


def test_what_is_not_a_record_is_refused() -> None:
    with pytest.raises(WireError, match="not a feedback kind"):
        feedback_from_wire({"kind": "vote", "response_id": 1})
    with pytest.raises(WireError, match="not a thumbs"):
        feedback_from_wire({"kind": "thumbs", "response_id": 1, "value": 1, "admin": True})
    with pytest.raises(WireError, match="not a response"):
        response_from_wire({"id": 1})
