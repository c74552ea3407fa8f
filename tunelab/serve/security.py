"""ASGI middleware in front of every route: the access log, the API key, the request body size.

The key protects every path, admin, /health and /metrics included (vLLM's protects /v1 only); it is
compared in constant time. The access log has method, path, status and time, never a prompt.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path

from ..errors import UserError
from .protocol import error_body


def read_api_key(path) -> str:
    """The key in `path` (surrounding whitespace dropped); an empty or unreadable file is a UserError."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--api-key-file {path}: cannot read it ({exc})") from None
    if not key:
        raise UserError(f"--api-key-file {path}: the file is empty")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise UserError(f"--api-key-file {path}: the key must be one line of printable characters without spaces")
    return key


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer KEY` (what the openai client sends) or `X-API-Key: KEY` matches."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or self.is_public(scope):
            return await self.app(scope, receive, send)
        given = self.credential(scope)
        if not hmac.compare_digest(given, self.key):
            return await self.refuse(scope, send, given)
        return await self.app(scope, receive, send)

    def is_public(self, scope) -> bool:
        """Paths served without the key (none here; the dashboard's login page)."""
        return False

    def credential(self, scope) -> bytes:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and not given:
                given = value.strip()
        return given

    async def refuse(self, scope, send, given: bytes) -> None:
        message = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer KEY)."
        body = error_body(message, "invalid_request_error", code="invalid_api_key")
        await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, by its Content-Length or as it arrives (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_body(f"The request body is larger than the server's limit of {self.limit} bytes.")
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return await send_json(send, 413 if value.isdigit() else 400, too_large)
        # read the body here (at most `limit` bytes) and hand it on whole
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client left; let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await send_json(send, 413, too_large)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class AccessLogMiddleware:
    """One line per request: client, method, path, status, milliseconds. Never a body."""

    def __init__(self, app, log, on_response=None):
        self.app, self.log, self.on_response = app, log, on_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            ms = (time.perf_counter() - start) * 1000
            client = (scope.get("client") or ("-", 0))[0]
            self.log(f"{client} {scope['method']} {scope['path']} {status[0]} {ms:.1f}ms")
            if self.on_response is not None:
                self.on_response(scope, status[0])
