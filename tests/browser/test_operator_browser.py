"""The Operator tab in a real browser: rolling back hot-swaps the served model and the registry
records it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import account_token, signed_in_page
from live_server import LiveServer, live_server

from tuneloop.core.config import DataDir
from tuneloop.core.records import ModelVersion
from tuneloop.feedback import registry
from tuneloop.feedback.store import FeedbackStore

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model_dir_b: Path
) -> Iterator[LiveServer]:
    """A server started without --model on a registry where policy-v2 replaced policy-v1."""
    data = DataDir(tmp_path_factory.mktemp("operator") / "data")
    with FeedbackStore(data.db) as store:
        for version_id, path in (("policy-v1", tiny_model_dir), ("policy-v2", tiny_model_dir_b)):
            registry.register_version(
                store,
                ModelVersion(
                    id=version_id, kind="policy", base="tiny", artifact_path=str(path.resolve())
                ),
            )
            registry.promote(store, version_id, reason="set up by the test")
    yield from live_server(data.root, None)


def health_version(server: LiveServer) -> str:
    return httpx.get(f"{server.url}/health").json()["model_version"]


def test_roll_back_serves_the_previous_version(page: Any, server: LiveServer) -> None:
    assert health_version(server) == "policy-v2"
    page.get_by_role("tab", name="Operator").click()
    served = page.locator("#operator-served")
    served.get_by_text("Serving model version policy-v2.").wait_for()

    page.get_by_role("button", name="Roll back").click()
    served.get_by_text("Serving model version policy-v1.").wait_for()
    page.get_by_text("Rolled back: serving policy-v1.").wait_for()
    assert health_version(server) == "policy-v1"
    versions = httpx.get(f"{server.url}/v1/admin/versions", headers=server.auth).json()
    assert {v["id"]: v["status"] for v in versions} == {
        "policy-v1": "promoted",
        "policy-v2": "rejected",
    }
    table = page.get_by_label("Model versions (newest first)")
    table.get_by_text("rollback: replaced by policy-v1").filter(visible=True).wait_for()

    # Nothing earlier is left: the operator is told so, and nothing changes.
    page.get_by_role("button", name="Roll back").click()
    page.get_by_text("no earlier policy version to roll back to than policy-v1").wait_for()
    assert health_version(server) == "policy-v1"


def test_the_operator_tab_is_for_operators_only(browser: Any, server: LiveServer) -> None:
    """A rater sees no Operator tab, and calling its handlers through Gradio's API (signed in
    as the rater) changes nothing: each handler checks the role on the server."""
    from gradio_client import Client

    token = account_token(server, "rita", "rater")
    page = signed_in_page(browser, server, "rita", token)
    try:
        page.get_by_text("Signed in as rita (rater)").wait_for()
        page.get_by_role("tab", name="Compare").wait_for()
        assert page.get_by_role("tab", name="Operator").count() == 0
    finally:
        page.context.close()

    served = health_version(server)
    client = Client(server.url, auth=("rita", token), verbose=False)
    for api_name in ("/on_rollback", "/on_promote"):
        client.predict(None, api_name=api_name)  # the handlers refuse before reading it
    assert health_version(server) == served
    versions = httpx.get(f"{server.url}/v1/admin/versions", headers=server.auth).json()
    assert {v["status"] for v in versions if v["id"] == served} == {"promoted"}
    with pytest.raises(ValueError):
        Client(server.url, auth=("rita", "not-her-token"), verbose=False)
