"""The dashboard's security, on top of the server's middleware (`tunelab.serve.security`).

- The API key: as for `tunelab serve` (a header), or the cookie the login page sets, since a browser
  cannot add a header to a page it navigates to. Without it a page request goes to /login, an API call
  gets the server's 401.
- Cross-site requests: a POST whose Origin is another site is refused (a page elsewhere could otherwise
  start or stop trainings through the user's browser), and on a loopback address a Host that is not
  loopback is refused (DNS rebinding: another site's name pointed at 127.0.0.1).
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from urllib.parse import quote, urlsplit

from ..serve.protocol import error_body
from ..serve.security import ApiKeyMiddleware, send_json

COOKIE = "tunelab_ui_key"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def cookie_key(scope) -> bytes:
    cookie = SimpleCookie()
    try:
        cookie.load(_header(scope, b"cookie"))
    except Exception:  # noqa: BLE001 - a malformed Cookie header is no credential
        return b""
    return cookie[COOKIE].value.encode() if COOKIE in cookie else b""


def key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


class DashboardKey(ApiKeyMiddleware):
    """The server's API key check, also taking the login cookie; /login and the static files are open."""

    def is_public(self, scope) -> bool:
        return scope["path"] == "/login" or scope["path"].startswith("/static/")

    def credential(self, scope) -> bytes:
        return super().credential(scope) or cookie_key(scope)

    async def refuse(self, scope, send, given: bytes) -> None:
        if scope["method"] == "GET" and "text/html" in _header(scope, b"accept"):
            target = scope["path"] + (f"?{scope['query_string'].decode()}" if scope.get("query_string") else "")
            location = f"/login?next={quote(target, safe='')}".encode()
            await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        await super().refuse(scope, send, given)


class SameOriginMiddleware:
    """403 for a state-changing request from another origin, and for a non-loopback Host on loopback."""

    def __init__(self, app, loopback: bool):
        self.app, self.loopback = app, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if self.loopback and urlsplit(f"//{host}").hostname not in LOOPBACK:
            return await send_json(send, 403, error_body(f"Host {host!r} is not this machine's loopback address."))
        origin = _header(scope, b"origin")
        if scope["method"] not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return await send_json(send, 403, error_body(f"cross-origin request from {origin} refused"))
        return await self.app(scope, receive, send)
