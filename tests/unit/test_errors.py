"""One table gives every error of the layers below serve its HTTP status; every route answers in
OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

from tuneloop.core.settings import SettingsError
from tuneloop.feedback.registry import RegistryError, UnknownVersionError
from tuneloop.feedback.validation import FeedbackError
from tuneloop.loop.control import BusyError
from tuneloop.serve.chat_service import UnknownConversationError
from tuneloop.serve.engine import EngineLoadError, EngineUnavailableError
from tuneloop.serve.errors import STATUS_BY_ERROR, error_response, status_of


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnknownConversationError("no conversation 7"), 404),  # a subclass of a 404 error
        (UnknownVersionError("no policy-v9"), 404),  # before its base, RegistryError: 409
        (RegistryError("policy-v2 is already promoted"), 409),
        (FeedbackError("value must be 1-5"), 422),
        (SettingsError("--set expects key=value"), 422),
        (BusyError("one at a time"), 409),
        (EngineLoadError("loading failed; policy-v1 is still served"), 500),
        (EngineUnavailableError("vLLM is restarting"), 503),
    ],
)
def test_each_error_has_one_status(error: Exception, status: int) -> None:
    assert status_of(error) == status


def test_a_subclass_comes_before_its_base_in_the_table() -> None:
    classes = [cls for cls, _ in STATUS_BY_ERROR]
    for i, cls in enumerate(classes):
        assert not any(issubclass(later, cls) for later in classes[i + 1 :]), cls


def test_errors_take_openais_shape() -> None:
    body = json.loads(error_response(503, "vLLM is restarting").body)
    assert body == {"error": {"message": "vLLM is restarting", "type": "server_error"}}
    assert json.loads(error_response(404, "x").body)["error"]["type"] == "invalid_request_error"
