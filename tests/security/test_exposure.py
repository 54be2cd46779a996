"""Less on show: the API's docs are off unless asked for, every response forbids framing and
sniffing, Gradio reports nothing home, the first admin's token leaves the disk at its first
use, and the gateway token can be replaced under a running server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.config import DataDir
from tuneloop.core.web_settings import WebSettings
from tuneloop.remote import ServerError, cli_token

DOCS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """Default settings, with the UI; Gradio's calls home recorded while it is built."""
    import gradio.analytics

    home: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradio.analytics, "version_check", lambda: home.append("version"))
        patch.setattr(gradio.analytics, "_do_analytics_request", lambda **kw: home.append(kw))
        for live in live_server(tmp_path_factory.mktemp("exposure") / "data", tiny_model_dir):
            assert home == [], "Gradio called home"
            yield live


def test_the_api_docs_are_off_by_default(server: LiveServer) -> None:
    for route in DOCS:
        assert httpx.get(f"{server.url}{route}").status_code in (401, 404), route
    # The UI's own API description is for those signed in only.
    assert httpx.get(f"{server.url}/gradio_api/info").status_code == 401


def test_every_response_forbids_framing_and_sniffing(server: LiveServer) -> None:
    for route in ("/", "/health", "/v1/models", "/config", "/gradio_api/info", "/nowhere"):
        got = httpx.get(f"{server.url}{route}")
        assert got.headers["x-frame-options"] == "DENY", route
        assert got.headers["content-security-policy"] == "frame-ancestors 'none'", route
        assert got.headers["x-content-type-options"] == "nosniff", route
        assert got.headers["referrer-policy"] == "same-origin", route
    refused = httpx.post(f"{server.url}/v1/feedback", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and refused.headers["x-frame-options"] == "DENY"


def test_forwarded_headers_of_an_untrusted_peer_count_for_nothing(server: LiveServer) -> None:
    """No --trusted-proxy: a client saying it came over https gets no `Secure` cookie, and a
    page claiming the https origin of this host is a foreign one."""
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    login = httpx.post(
        f"{server.url}/login",
        data={"username": "admin", "password": server.token},
        headers=forged,
    )
    assert login.status_code == 200
    for cookie in login.headers.get_list("set-cookie"):
        assert "secure" not in [a.strip().lower() for a in cookie.split(";")[1:]], cookie
    https_page = {**forged, "Origin": server.url.replace("http://", "https://")}
    assert httpx.post(f"{server.url}/login", headers=https_page).status_code == 403


def test_a_new_gateway_token_replaces_the_old_at_once(server: LiveServer) -> None:
    path = server.data_dir.gateway_token_file
    old = {"Authorization": f"Bearer {path.read_text().strip()}"}
    counts = f"{server.url}/v1/gateway/counts"
    assert httpx.get(counts, headers=old).status_code == 200
    rotated = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "gateway", "token"]
        + ["--data-dir", str(server.data_dir.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "gateways reading this file" in rotated.stdout
    new = {"Authorization": f"Bearer {path.read_text().strip()}"}
    assert new != old and oct(path.stat().st_mode & 0o777) == "0o600"
    assert httpx.get(counts, headers=old).status_code == 401
    writes = httpx.post(f"{server.url}/v1/gateway/writes", json={"ops": []}, headers=old)
    assert writes.status_code == 401
    assert httpx.get(counts, headers=new).status_code == 200
    assert httpx.get(counts, headers=server.auth).status_code == 401  # an account's: never


def test_api_docs_on_request_and_the_admin_token_file_gone_at_its_first_use(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = WebSettings(api_docs=True)
    for server in live_server(tmp_path / "data", tiny_model_dir, ui=False, web=web):
        for route in DOCS[:3]:
            assert httpx.get(f"{server.url}{route}").status_code == 200, route
        token_file = server.data_dir.admin_token_file
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        wrong = {"Authorization": "Bearer tl_guess"}
        assert httpx.get(f"{server.url}/v1/models", headers=wrong).status_code == 401
        assert token_file.exists()  # a failed sign-in leaves it
        assert httpx.get(f"{server.url}/v1/models", headers=server.auth).status_code == 200
        assert not token_file.exists()
        assert httpx.get(f"{server.url}/v1/models", headers=server.auth).status_code == 200
        monkeypatch.delenv("TUNELOOP_TOKEN", raising=False)
        with pytest.raises(ServerError, match="set TUNELOOP_TOKEN"):
            cli_token(DataDir(server.data_dir.root))
