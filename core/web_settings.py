"""How the web server meets browsers and proxies: which origins may change things, whose
`X-Forwarded-*` headers count, how long a UI session lasts, whether the API's docs are served.
Each is a `tuneloop up` option (`tuneloop.cli_settings`); `serve.web_security` and
`serve.sessions` apply them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from tuneloop.core.settings import SettingsError, setting

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(scheme: str, host: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin`: lower case, no default port."""
    scheme, host = scheme.lower(), host.lower()
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if name and port.isdigit() and int(port) == _DEFAULT_PORTS.get(scheme):
        host = name
    return f"{scheme}://{host}"


def parse_origin(url: str) -> str:
    """An origin given on the command line (`https://chat.example.org`, maybe with a port), in
    the form `normal_origin` gives; a SettingsError for anything else (a path, a wildcard)."""
    parts = urlsplit(url.strip())
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.netloc
        or "*" in parts.netloc
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise SettingsError(
            f"an allowed origin is scheme://host[:port], e.g. https://chat.example.org; got {url!r}"
        )
    return normal_origin(parts.scheme, parts.netloc)


def parse_proxy(spec: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A trusted proxy: an IP address or a CIDR block."""
    try:
        return ipaddress.ip_network(spec.strip(), strict=False)
    except ValueError:
        raise SettingsError(
            f"a trusted proxy is an IP address or a CIDR block, e.g. 10.0.0.5 or 10.0.0.0/24; "
            f"got {spec!r}"
        ) from None


@dataclass(frozen=True)
class WebSettings:
    """The browser-facing side of `tuneloop up`. State-changing requests (any method but GET,
    HEAD, OPTIONS) from a page of another origin are refused; the server's own origin (the
    request's scheme and Host) is always allowed, `allowed_origins` besides it. A request's
    client address and scheme come from `X-Forwarded-For` and `X-Forwarded-Proto` only when it
    came from a `trusted_proxies` address. A UI session ends after `session_idle_minutes`
    without a request, and `session_max_hours` after sign-in, whatever happens."""

    allowed_origins: tuple[str, ...] = setting(
        (),
        "an origin besides the server's own whose pages may send state-changing requests, "
        "scheme://host[:port], e.g. the public https URL in front of a proxy that rewrites Host "
        "(repeatable)",
        option="allowed_origin",
        metavar="URL",
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "an IP address or CIDR block of a reverse proxy whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (repeatable; default: none, the peer is the client)",
        option="trusted_proxy",
        metavar="ADDRESS",
    )
    session_idle_minutes: float = setting(
        480.0,
        "a UI session ends after this many minutes without a request",
        option="session_idle_minutes",
    )
    session_max_hours: float = setting(
        24.0, "a UI session ends this many hours after sign-in", option="session_max_hours"
    )
    api_docs: bool = setting(
        False, "serve the API's /docs, /redoc and /openapi.json (off by default)", option="api_docs"
    )

    def __post_init__(self) -> None:
        origins = tuple(parse_origin(o) for o in self.allowed_origins)
        object.__setattr__(self, "allowed_origins", origins)
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        self.proxy_networks()  # a SettingsError now, not at the first request
        if self.session_idle_minutes <= 0 or self.session_max_hours <= 0:
            raise SettingsError("a session's idle and absolute limits are above 0")

    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(parse_proxy(p) for p in self.trusted_proxies)

    @property
    def session_idle_s(self) -> float:
        return self.session_idle_minutes * 60.0

    @property
    def session_max_s(self) -> float:
        return self.session_max_hours * 3600.0
