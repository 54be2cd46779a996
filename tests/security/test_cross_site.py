"""A page of another origin, in a signed-in person's browser, can make this server do nothing:
state-changing requests to Gradio's routes and to /v1 from a foreign `Origin` are refused
before any handler runs, its preflights get no CORS grant, nothing it may read carries one, and
session cookies are `SameSite=Lax` (`Secure` over TLS)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest
from live_server import LiveServer, live_server, ui_queue_call

from tuneloop.cli import build_parser
from tuneloop.cli_settings import settings_from_args
from tuneloop.core.settings import SettingsError
from tuneloop.core.web_settings import WebSettings

PUBLIC = "https://chat.example.org"  # the allowed origin: a proxy's public URL
EVIL = "https://evil.example"
# A non-local Host: Gradio's own CORS check grants any origin then.
FOREIGN = {"Host": "chat.example.org", "Origin": EVIL}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """The UI behind a proxy on this machine (127.0.0.1 is trusted), published at `PUBLIC`."""
    web = WebSettings(allowed_origins=(PUBLIC,), trusted_proxies=("127.0.0.1",))
    yield from live_server(tmp_path_factory.mktemp("cross-site") / "data", tiny_model_dir, web=web)


@pytest.fixture(scope="module")
def admin_ui(server: LiveServer) -> Iterator[httpx.Client]:
    """The first admin, signed in to the UI: what a foreign page would ride on."""
    with server.ui_client("admin", server.token) as client:
        yield client


def counts(server: LiveServer) -> dict[str, int]:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return {
            table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("responses", "accounts", "audit_log", "thumbs")
        }


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def on_send_body(admin_ui: httpx.Client) -> dict:
    """A queue event that asks the model and stores its answer (the Chat tab's send)."""
    dependencies = admin_ui.get("/config").json()["dependencies"]
    fn = next(d["id"] for d in dependencies if d.get("api_name") == "on_send")
    return {"data": ["Say hi.", None, 0.7], "fn_index": fn, "session_hash": "cross-site"}


def attacks(server: LiveServer, admin_ui: httpx.Client) -> list[tuple[str, dict, dict]]:
    """(route, JSON or form body, extra headers): each would change something if let through."""
    bearer = server.auth
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        ("/gradio_api/queue/join", {"json": on_send_body(admin_ui)}, {}),
        ("/gradio_api/run/on_send", {"json": {"data": ["Say hi.", None, 0.7]}}, {}),
        ("/login", {"data": {"username": "admin", "password": server.token}}, {}),
        ("/v1/admin/users", {"json": {"name": "mallory", "role": "admin"}}, bearer),
        ("/v1/chat/completions", {"json": chat}, bearer),
        ("/v1/feedback", {"json": {"kind": "thumbs", "response_id": 1, "value": 1}}, bearer),
    ]


def test_a_foreign_preflight_gets_a_403_and_no_cors_grant(
    server: LiveServer, admin_ui: httpx.Client
) -> None:
    for route, _, _ in attacks(server, admin_ui):
        preflight = admin_ui.options(
            route,
            headers={
                **FOREIGN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert preflight.status_code == 403, (route, preflight.text)
        assert cors_headers(preflight) == {}, route
        assert "cross-site request refused" in preflight.json()["error"]["message"]
    # The allowed origin's preflight reaches Gradio, which grants it.
    allowed = admin_ui.options(
        "/gradio_api/queue/join",
        headers={**FOREIGN, "Origin": PUBLIC, "Access-Control-Request-Method": "POST"},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == PUBLIC


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(FOREIGN, id="foreign origin"),
        pytest.param({"Host": "chat.example.org", "Origin": "null"}, id="null origin"),
        pytest.param({"Origin": "http://127.0.0.1.evil.example"}, id="look-alike origin"),
        pytest.param({"Sec-Fetch-Site": "cross-site"}, id="cross-site without origin"),
    ],
)
def test_foreign_state_changing_requests_are_refused_and_change_nothing(
    server: LiveServer, admin_ui: httpx.Client, headers: dict[str, str]
) -> None:
    before = counts(server)
    for route, body, extra in attacks(server, admin_ui):
        refused = admin_ui.post(route, headers={**headers, **extra}, **body)
        assert refused.status_code == 403, (route, refused.text)
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert cors_headers(refused) == {}, route
        assert "set-cookie" not in refused.headers  # no session from a foreign sign-in
    time.sleep(0.5)  # an answer let through would be stored by now
    assert counts(server) == before


def test_the_servers_own_and_allowed_origins_change_things(
    server: LiveServer, admin_ui: httpx.Client
) -> None:
    """The check is no blanket refusal: the page's own origin (here behind the trusted proxy,
    which says the request came over https) and `--allowed-origin` go through."""
    same = {"Host": "chat.example.org", "Origin": PUBLIC, "X-Forwarded-Proto": "https"}
    own = {"Origin": server.url}  # the Host httpx sends: 127.0.0.1:port
    for headers in (same, own, {"Origin": PUBLIC}):
        before = counts(server)["responses"]
        status, stream = ui_queue_call(admin_ui, "on_send", "Say hi.", None, 0.7, headers=headers)
        assert status == 200 and "process_completed" in stream, stream
        deadline = time.monotonic() + 10
        while counts(server)["responses"] == before:
            assert time.monotonic() < deadline, "the answer was not stored"
            time.sleep(0.1)


def test_what_a_foreign_page_may_read_carries_no_cors_grant(
    server: LiveServer, admin_ui: httpx.Client
) -> None:
    for route in ("/config", "/gradio_api/info", "/", "/health"):
        read = admin_ui.get(route, headers=FOREIGN)
        assert read.status_code == 200, route
        assert cors_headers(read) == {}, route


def test_session_cookies_are_same_site_lax_and_secure_over_tls(server: LiveServer) -> None:
    form = {"username": "admin", "password": server.token}
    plain = httpx.post(f"{server.url}/login", data=form)
    tls = httpx.post(f"{server.url}/login", data=form, headers={"X-Forwarded-Proto": "https"})
    for response, secure in ((plain, False), (tls, True)):
        cookies = response.headers.get_list("set-cookie")
        assert len(cookies) == 2 and response.status_code == 200
        for cookie in cookies:
            attributes = [a.strip().lower() for a in cookie.split(";")[1:]]
            assert "samesite=lax" in attributes and "samesite=none" not in attributes
            assert ("secure" in attributes) is secure, cookie


def test_allowed_origins_are_origins_as_browsers_send_them() -> None:
    argv = ["up", "--allowed-origin", "HTTPS://Chat.Example.org:443/"]
    argv += ["--allowed-origin", "http://10.0.0.5:8080", "--trusted-proxy", "10.0.0.0/8"]
    argv += ["--api-docs", "--session-idle-minutes", "30", "--session-max-hours", "8"]
    web = settings_from_args(WebSettings, build_parser().parse_args(argv))
    assert web == WebSettings(
        allowed_origins=(PUBLIC, "http://10.0.0.5:8080"),
        trusted_proxies=("10.0.0.0/8",),
        api_docs=True,
        session_idle_minutes=30,
        session_max_hours=8,
    )
    assert settings_from_args(WebSettings, build_parser().parse_args(["up"])) == WebSettings()
    for bad in ("*", "https://*.example.org", f"{PUBLIC}/app", "chat.example.org", "null"):
        with pytest.raises(SettingsError, match="scheme://host"):
            WebSettings(allowed_origins=(bad,))
