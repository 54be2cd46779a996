"""UI sessions are tied to the token that signed in: a new token, a disabled account, a new role,
a sign-out, idle time or age ends the session, for Gradio (which asks for a sign-in again) and for
every handler (`ui_common.signed_in`), and nothing sent with it afterwards changes anything."""

from __future__ import annotations

import contextvars
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import httpx
import pytest
from browser.conftest import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM
from live_server import LiveServer, live_server, ui_call, ui_queue_call

from tuneloop.core.records import Account
from tuneloop.core.web_settings import WebSettings
from tuneloop.feedback.accounts import token_sha256
from tuneloop.serve.auth import Principals
from tuneloop.serve.sessions import Sessions
from tuneloop.serve.ui_common import signed_in

# --- The registry on its own, on a clock of the test's --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """Accounts as the store would give them, and the UI's sessions over them, installed in a
    stand-in of Gradio's app (its token table and cookie id are all Gradio gives them)."""

    def __init__(self) -> None:
        self.tokens = {"tl_ann": Account("ann", "operator")}
        self.clock = Clock()
        self.principals = Principals(self.load)
        self.sessions = Sessions(self.principals, idle_s=60, max_s=600, clock=self.clock)
        self.principals.sessions = self.sessions
        self.gradio = SimpleNamespace(cookie_id="app")
        self.sessions.install(self.gradio)

    def load(self) -> dict[str, Account]:
        return {token_sha256(t): a for t, a in self.tokens.items() if not a.disabled}

    def change(self, token: str, account: Account | None) -> None:
        """An account change, as `serve.admin_users` makes it: the store, then a reload."""
        if account is None:
            del self.tokens[token]
        else:
            self.tokens[token] = account
        self.principals.reload()

    def sign_in(self, name: str, token: str) -> str | None:
        """What Gradio's `POST /login` does, in a request (context) of its own: check the
        password, then record a new cookie in its token table."""

        def login() -> str | None:
            if not self.gradio.auth(name, token):
                return None
            cookie = uuid.uuid4().hex
            self.gradio.tokens[cookie] = name
            return cookie

        self.gradio.auth = self.sessions.check_password
        return contextvars.copy_context().run(login)

    def user(self, cookie: str | None) -> str | None:
        """Who Gradio thinks a cookie signs in (it asks on every request)."""
        return self.gradio.tokens.get(cookie)

    def handler(self, cookie: str | None, role: str = "user") -> Account | None:
        """`signed_in` as a handler calls it, with the request Gradio hands it."""
        cookies = {"access-token-unsecure-app": cookie} if cookie else {}
        request = SimpleNamespace(
            request=SimpleNamespace(cookies=cookies), username=self.user(cookie)
        )
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            account = signed_in(self.principals, request, role)
        if account is None:
            assert "Sign in again" in str(said[0].message) or "this needs" in str(said[0].message)
        return account


@pytest.fixture
def reg() -> Registry:
    return Registry()


def test_a_session_holds_while_its_token_role_and_account_do(reg: Registry) -> None:
    assert reg.sign_in("ann", "tl_wrong") is None
    assert reg.sign_in("bob", "tl_ann") is None  # another name with ann's token
    cookie = reg.sign_in("ann", "tl_ann")
    assert reg.user(cookie) == "ann"
    assert reg.handler(cookie, "operator") == Account("ann", "operator")
    assert reg.handler(cookie, "admin") is None  # the role is checked as before
    assert reg.user("a-cookie-no-one-was-given") is None
    assert reg.handler(None) is None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda reg: reg.change("tl_ann", None), id="new token"),
        pytest.param(
            lambda reg: reg.change("tl_ann", Account("ann", "operator", disabled=True)),
            id="disabled",
        ),
        pytest.param(lambda reg: reg.change("tl_ann", Account("ann", "user")), id="new role"),
    ],
)
def test_an_account_change_ends_its_sessions_for_good(reg: Registry, change: Any) -> None:
    cookie = reg.sign_in("ann", "tl_ann")
    other = reg.sign_in("ann", "tl_ann")
    change(reg)
    assert reg.handler(cookie) is None and reg.user(cookie) is None
    reg.change("tl_ann", Account("ann", "operator"))  # back as it was: the sessions stay ended
    assert reg.user(cookie) is None
    assert cookie not in reg.sessions.cookies() and other not in reg.sessions.cookies()
    assert reg.user(reg.sign_in("ann", "tl_ann")) == "ann"  # a new sign-in works


def test_sessions_end_when_idle_or_old(reg: Registry) -> None:
    cookie = reg.sign_in("ann", "tl_ann")
    reg.clock.now += 59
    assert reg.user(cookie) == "ann"  # a request: idle time starts again
    reg.clock.now += 59
    assert reg.user(cookie) == "ann"
    reg.clock.now += 61
    assert reg.user(cookie) is None
    busy = reg.sign_in("ann", "tl_ann")
    for _ in range(10):  # never idle, but 600 s after its sign-in it ends
        reg.clock.now += 59
        assert reg.user(busy) == "ann"
    reg.clock.now += 59
    assert reg.user(busy) is None
    assert reg.sessions.cookies() == []


def test_sign_out_ends_a_session_and_a_cookie_without_a_sign_in_is_refused(reg: Registry) -> None:
    cookie = reg.sign_in("ann", "tl_ann")
    # Gradio's /logout: every session of the user, by listing its table.
    for key in list(reg.gradio.tokens.keys()):
        if reg.gradio.tokens[key] == "ann":
            del reg.gradio.tokens[key]
    assert reg.user(cookie) is None and cookie not in reg.gradio.tokens
    with pytest.raises(RuntimeError, match="without a sign-in"):
        reg.gradio.tokens["forged"] = "ann"
    assert reg.user("forged") is None


def test_a_handler_refuses_a_session_its_gradio_request_does_not_name(reg: Registry) -> None:
    """`signed_in` asks the registry itself: a user name alone (as Gradio's request carries it)
    signs no one in."""
    request = SimpleNamespace(request=SimpleNamespace(cookies={}), username="ann")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert signed_in(reg.principals, request) is None
    cookie = reg.sign_in("ann", "tl_ann")
    pickled = SimpleNamespace(request=None, kwargs={"cookies": {"access-token-app": cookie}})
    pickled.username = "ann"
    assert signed_in(reg.principals, pickled) == Account("ann", "operator")


# --- On a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    yield from live_server(tmp_path_factory.mktemp("sessions") / "data", tiny_model_dir)


def responses(server: LiveServer) -> int:
    with duckdb.connect(str(server.data_dir.db)) as con:
        return con.execute("SELECT count(*) FROM responses").fetchone()[0]


def refused_everywhere(server: LiveServer, client: httpx.Client) -> None:
    """The session's cookie gets Gradio's sign-in (401) from every kind of UI call, the Operator
    tab's visibility included, and nothing is stored."""
    before = responses(server)
    assert ui_call(client, "greet").status_code == 401
    assert ui_call(client, "show").status_code == 401
    assert ui_call(client, "on_send", "hello", None, 0.7).status_code == 401
    assert ui_queue_call(client, "on_send", "hello", None, 0.7)[0] == 401
    assert responses(server) == before


def operator_tab_shown(client: httpx.Client) -> bool:
    shown = ui_call(client, "show")
    assert shown.status_code == 200, shown.text
    return shown.json()["data"][0]["visible"]


def test_a_live_session_answers_and_stores_as_its_account(server: LiveServer) -> None:
    token = server.account_token("sam", "operator")
    with server.ui_client("sam", token) as ui:
        greeting = ui_call(ui, "greet").json()["data"][0]
        assert "Signed in as **sam** (operator)" in greeting
        assert operator_tab_shown(ui)
        before = responses(server)
        status, stream = ui_queue_call(ui, "on_send", "What is a list?", None, 0.7)
        assert status == 200 and "process_completed" in stream, stream
        deadline = time.monotonic() + 10  # the answer is stored as its stream ends
        while responses(server) == before:
            assert time.monotonic() < deadline, "the answer was not stored"
            time.sleep(0.1)
        assert responses(server) == before + 1


@pytest.mark.parametrize("change", ["token", "disable", "role"])
def test_a_changed_account_ends_its_ui_sessions(server: LiveServer, change: str) -> None:
    name = f"ops-{change}"
    token = server.account_token(name, "operator")
    admin = httpx.Client(base_url=server.url, headers=server.auth, timeout=30)
    bearer = {"Authorization": f"Bearer {token}"}
    with server.ui_client(name, token) as ui, admin:
        assert operator_tab_shown(ui)
        if change == "token":
            token = admin.post(f"/v1/admin/users/{name}/token").json()["token"]
            assert httpx.get(f"{server.url}/v1/models", headers=bearer).status_code == 401
        elif change == "disable":
            assert admin.post(f"/v1/admin/users/{name}/disable").status_code == 200
            assert httpx.get(f"{server.url}/v1/models", headers=bearer).status_code == 401
        else:
            assert admin.post(f"/v1/admin/users/{name}/role", json={"role": "user"}).is_success
            versions = httpx.get(f"{server.url}/v1/admin/versions", headers=bearer)
            assert versions.status_code == 403
        refused_everywhere(server, ui)
        if change == "disable":  # enabled again: the session stays ended
            assert admin.post(f"/v1/admin/users/{name}/enable").status_code == 200
            assert ui_call(ui, "greet").status_code == 401
        with server.ui_client(name, token) as again:  # a new sign-in, as the account is now
            assert operator_tab_shown(again) is (change != "role")


def test_signing_out_or_a_cookie_never_given_gets_no_session(server: LiveServer) -> None:
    token = server.account_token("leo", "user")
    with server.ui_client("leo", token) as ui:
        cookies = dict(ui.cookies)
        assert ui.get("/logout").status_code == 302
    with httpx.Client(base_url=server.url, cookies=cookies) as replayed:
        assert ui_call(replayed, "greet").status_code == 401
    forged = {name: "not-a-session" for name in cookies}
    with httpx.Client(base_url=server.url, cookies=forged) as stranger:
        assert ui_call(stranger, "greet").status_code == 401


def test_sessions_time_out_when_idle_and_when_old(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Idle 2.4 s, at most 5.4 s (`--session-idle-minutes 0.04 --session-max-hours 0.0015`)."""
    web = WebSettings(session_idle_minutes=0.04, session_max_hours=0.0015)
    for server in live_server(tmp_path / "data", tiny_model_dir, web=web):
        token = server.account_token("ida", "user")
        with server.ui_client("ida", token) as ui:
            assert ui_call(ui, "greet").status_code == 200
            time.sleep(3.0)
            assert ui_call(ui, "greet").status_code == 401
        started = time.monotonic()
        with server.ui_client("ida", token) as ui:
            while (status := ui_call(ui, "greet").status_code) == 200:
                assert time.monotonic() - started < 9, "the session outlived its limit"
                time.sleep(0.4)
            assert status == 401 and time.monotonic() - started >= 5.4


@pytest.mark.browser
def test_in_a_browser_a_new_role_signs_the_page_out_and_hides_the_operator_tab(
    server: LiveServer,
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(reason=NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api")
    token = server.account_token("opal", "operator")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context().new_page()
        page.set_default_timeout(20_000)

        def sign_in() -> None:
            page.goto(server.url)
            page.get_by_label("username").fill("opal")
            page.get_by_label("password").fill(token)
            page.get_by_role("button", name="Login").click()
            page.get_by_role("tab", name="Chat").wait_for()

        sign_in()
        page.get_by_role("tab", name="Operator").wait_for()
        assert {c["sameSite"] for c in page.context.cookies()} == {"Lax"}
        admin = httpx.post(
            f"{server.url}/v1/admin/users/opal/role", json={"role": "user"}, headers=server.auth
        )
        assert admin.status_code == 200
        page.reload()
        page.get_by_role("button", name="Login").wait_for()  # Gradio asks for a sign-in
        assert page.get_by_role("tab", name="Operator").count() == 0
        sign_in()
        page.locator("#signed-in-as").get_by_text("Signed in as opal (user)").wait_for()
        page.wait_for_timeout(500)  # the page's other load event: the Operator tab's visibility
        assert not page.get_by_role("tab", name="Operator").is_visible()
        browser.close()
