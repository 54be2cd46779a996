"""What another web page can make this server do: nothing. One ASGI middleware in front of the
API and Gradio's UI (`WebGuard`):

- The client: a request's address and scheme are its peer's, unless the peer is a trusted proxy
  (`--trusted-proxy`); then `X-Forwarded-For` and `X-Forwarded-Proto` say them. The layers below
  see the result in the ASGI scope (uvicorn's own proxy handling, which trusts 127.0.0.1, is off:
  `server.serve_app`), so a forged `X-Forwarded-For` counts for nothing.
- Cross-site requests: a state-changing request (any method but GET, HEAD, OPTIONS) whose
  `Origin` is neither the server's own (the request's scheme and Host) nor allowed
  (`--allowed-origin`), or that says `Sec-Fetch-Site: cross-site` without an `Origin`, gets a 403
  before any handler runs; so does a preflight from such an origin, with no CORS headers. Gradio
  adds its own CORS headers, granting any origin with credentials whenever Host is not local
  (`gradio.route_utils.CustomCORSMiddleware`): responses to a foreign origin lose every
  `access-control-*` header.
- Cookies: every `Set-Cookie` gets `SameSite=Lax` (Gradio's session cookie says `none`), and
  `Secure` exactly when the request came over TLS.
- Every response says it may not be framed (`X-Frame-Options`, CSP `frame-ancestors`), nor
  sniffed, and sends no Referer to other sites.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from tuneloop.core.web_settings import normal_origin
from tuneloop.serve.errors import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Proxies:
    """The reverse proxies whose `X-Forwarded-*` headers are believed."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.strip().strip("[]"))
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def resolve(self, scope: dict[str, Any]) -> dict[str, Any]:
        """`scope` with the client's address and scheme: the peer's, or what a trusted proxy
        forwarded. `X-Forwarded-For` is read from the right; the first hop that is not a trusted
        proxy is the client (the hops left of it could be anything the client wrote)."""
        peer = (scope.get("client") or ("", 0))[0]
        if not self.networks or not self.trusts(peer):
            return scope
        headers = _headers(scope)
        client = peer
        for hop in reversed(headers.get("x-forwarded-for", "").split(",")):
            if hop.strip():
                client = hop.strip()
                if not self.trusts(client):
                    break
        scheme = scope.get("scheme", "http")
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            secure = proto == "https"
            scheme = ("wss" if secure else "ws") if scope["type"] == "websocket" else proto
        return {**scope, "client": (client, 0), "scheme": scheme}


class WebGuard:
    """ASGI middleware, outermost: see the module's docstring."""

    def __init__(
        self,
        app: Any,
        allowed_origins: Iterable[str] = (),
        trusted_proxies: Iterable[Network] = (),
    ) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)
        self.proxies = Proxies(trusted_proxies)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope = self.proxies.resolve(scope)
        headers = _headers(scope)
        tls = scope.get("scheme") in ("https", "wss")
        origin = headers.get("origin")
        own = _own_origin(headers, tls)
        foreign = origin is not None and not self._allowed(origin, own)
        refusal = None
        if scope["type"] == "websocket":
            refusal = f"a page of {origin}" if foreign else None
        elif foreign and scope["method"] not in SAFE_METHODS:
            refusal = f"a page of {origin}"
        elif foreign and "access-control-request-method" in headers:
            refusal = f"a page of {origin} (preflight)"
        elif (
            origin is None
            and scope["method"] not in SAFE_METHODS
            and headers.get("sec-fetch-site") == "cross-site"
        ):
            refusal = "a page of another site (Sec-Fetch-Site: cross-site)"

        async def guarded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _guard_headers(message, foreign, tls)}
            await send(message)

        if refusal is None:
            await self.app(scope, receive, guarded)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            message = (
                f"cross-site request refused: {refusal} may not change anything here (this "
                f"server's origin is {own or 'unknown'}; `tuneloop up --allowed-origin URL` "
                "allows another, e.g. the public URL in front of a proxy, and behind a TLS proxy "
                "give --trusted-proxy)"
            )
            await error_response(403, message)(scope, receive, guarded)

    def _allowed(self, origin: str, own: str | None) -> bool:
        parts = urlsplit(origin.strip())
        if not parts.scheme or not parts.netloc:
            return False  # "null" (a sandboxed frame, a file), or garbage
        given = normal_origin(parts.scheme, parts.netloc)
        return given == own or given in self.allowed_origins


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers by lower-case name; repeated ones joined with commas."""
    found: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        found[name] = f"{found[name]},{value}" if name in found else value
    return found


def _own_origin(headers: dict[str, str], tls: bool) -> str | None:
    """The origin the request was sent to: its scheme and Host."""
    host = headers.get("host")
    return normal_origin("https" if tls else "http", host) if host else None


def _guard_headers(message: dict[str, Any], foreign: bool, tls: bool) -> list[tuple[bytes, bytes]]:
    """A response's headers as they leave: no CORS grant to a foreign origin, cookies
    `SameSite=Lax` (and `Secure` over TLS), the security headers."""
    headers: list[tuple[bytes, bytes]] = []
    for name, value in message.get("headers", ()):
        key = name.lower()
        if foreign and key.startswith(b"access-control-"):
            continue
        if key == b"set-cookie":
            value = same_site_cookie(value, tls)
        elif key == b"content-security-policy" and b"frame-ancestors" not in value:
            value += b"; frame-ancestors 'none'"
        headers.append((name, value))
    present = {name.lower() for name, _ in headers}
    headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
    return headers


def same_site_cookie(value: bytes, tls: bool) -> bytes:
    """A `Set-Cookie` value with `SameSite=Lax`, and `Secure` exactly when `tls`."""
    cookie, *attributes = (part.strip() for part in value.decode("latin-1").split(";"))
    replaced = ("samesite", "secure")
    kept = [a for a in attributes if a and a.split("=", 1)[0].strip().lower() not in replaced]
    secure = ["Secure"] if tls else []
    return "; ".join([cookie, *kept, "SameSite=Lax", *secure]).encode("latin-1")
