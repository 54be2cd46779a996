"""Guessing tokens at the UI's sign-in: attempts are limited per account name (from any number of
addresses) and per address (whatever the name), an address is what the peer is unless the peer
is a trusted proxy, and the first admin's token file goes at its first sign-in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server

from tuneloop.core.settings import LimitSettings, SettingsError
from tuneloop.core.web_settings import WebSettings
from tuneloop.serve.web_security import Proxies

LIMITS = LimitSettings(logins_per_minute=3)
REFUSED_AFTER_3 = [400, 400, 400, 429, 429]


@pytest.fixture(scope="module")
def behind_proxy(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[LiveServer]:
    """The UI behind a proxy on this machine: 127.0.0.1's X-Forwarded-For is believed."""
    web = WebSettings(trusted_proxies=("127.0.0.1",))
    data = tmp_path_factory.mktemp("sign-in-proxy") / "data"
    yield from live_server(data, tiny_model_dir, limits=LIMITS, web=web)


def attempt(
    server: LiveServer, name: str, forwarded_for: str | None = None, token: str = "tl_guess"
) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    form = {"username": name, "password": token}
    return httpx.post(f"{server.url}/login", data=form, headers=headers).status_code


def test_one_name_is_limited_from_any_number_of_addresses(behind_proxy: LiveServer) -> None:
    codes = [attempt(behind_proxy, "admin", f"198.51.100.{i}") for i in range(5)]
    assert codes == REFUSED_AFTER_3
    # The name waits, whatever it sends and wherever from; other names do not.
    assert attempt(behind_proxy, "admin", "198.51.100.99", behind_proxy.token) == 429
    assert attempt(behind_proxy, "someone-else", "198.51.100.98") == 400
    refused = httpx.post(
        f"{behind_proxy.url}/login",
        data={"username": "admin", "password": "tl_guess"},
        headers={"X-Forwarded-For": "198.51.100.97"},
    )
    assert int(refused.headers["retry-after"]) >= 1
    assert "for 'admin'" in refused.json()["error"]["message"]


def test_one_address_is_limited_whatever_the_name(behind_proxy: LiveServer) -> None:
    codes = [attempt(behind_proxy, f"name{i}", "192.0.2.7") for i in range(5)]
    assert codes == REFUSED_AFTER_3
    # A client cannot hide behind hops it adds itself: the hop the proxy saw is the address.
    codes = [attempt(behind_proxy, f"other{i}", f"10.{i}.0.1, 192.0.2.8") for i in range(5)]
    assert codes == REFUSED_AFTER_3


def test_a_forged_forwarded_for_from_an_untrusted_peer_is_ignored(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    for server in live_server(tmp_path / "data", tiny_model_dir, limits=LIMITS):
        codes = [attempt(server, f"name{i}", f"203.0.113.{i}") for i in range(5)]
        assert codes == REFUSED_AFTER_3  # all of them 127.0.0.1's


def test_the_first_admins_token_file_goes_at_its_first_ui_sign_in(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for server in live_server(tmp_path / "data", tiny_model_dir):
        token_file = server.data_dir.admin_token_file
        assert attempt(server, "admin") == 400 and token_file.exists()
        assert attempt(server, "admin", token=server.token) == 200
        assert not token_file.exists()
        assert attempt(server, "admin", token=server.token) == 200  # the token still works
    log = capsys.readouterr().out
    assert log.count(server.token) == 1  # printed once, at the first start
    assert f"removed {token_file}" in log


def test_proxies_are_addresses_or_blocks_and_the_client_is_the_first_untrusted_hop() -> None:
    proxies = Proxies(WebSettings(trusted_proxies=("10.0.0.0/8", "::1")).proxy_networks())

    def client(peer: str, forwarded_for: str, proto: str = "") -> tuple[str, str]:
        headers = [(b"x-forwarded-for", forwarded_for.encode())]
        headers += [(b"x-forwarded-proto", proto.encode())] if proto else []
        scope = {"type": "http", "client": (peer, 5000), "scheme": "http", "headers": headers}
        resolved = proxies.resolve(scope)
        return resolved["client"][0], resolved["scheme"]

    assert client("10.1.2.3", "1.2.3.4", "https") == ("1.2.3.4", "https")
    assert client("::1", "6.6.6.6, 1.2.3.4, 10.9.9.9") == ("1.2.3.4", "http")
    assert client("192.0.2.1", "1.2.3.4", "https") == ("192.0.2.1", "http")  # not a proxy
    assert client("10.1.2.3", "") == ("10.1.2.3", "http")
    assert proxies.trusts("10.255.0.1") and not proxies.trusts("11.0.0.1")
    assert ipaddress.ip_network("::1/128") in proxies.networks
    with pytest.raises(SettingsError, match="IP address or a CIDR block"):
        WebSettings(trusted_proxies=("proxy.example.org",))
