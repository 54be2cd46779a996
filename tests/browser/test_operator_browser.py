"""The Operator tab in a real browser: rolling back hot-swaps the served model and the registry
records it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
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
    token = server.data_dir.admin_token_file.read_text()
    versions = httpx.get(
        f"{server.url}/v1/admin/versions", headers={"Authorization": f"Bearer {token}"}
    ).json()
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
