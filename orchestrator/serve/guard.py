"""What a request must pass before any work is done for it: the API key, and a body no
bigger than the limit (refused unread when its Content-Length says so, else as soon as it
has grown past the limit)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from orchestrator.serve.gate import ApiError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = ("/v1/", "/api/", "/metrics")  # the page itself is public; it asks for the key


def bearer(header: str) -> str:
    """The token of ``Authorization: Bearer TOKEN``; the scheme in any case (RFC 9110)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class ApiKeyGuard:
    """ASGI middleware: requests under ``GUARDED`` need ``Authorization: Bearer KEY``.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which stands between an
    endpoint and the client's disconnect."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key and scope["type"] == "http" and scope["path"].startswith(GUARDED):
            headers = dict(scope["headers"])
            given = bearer(headers.get(b"authorization", b"").decode("latin-1"))
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                await _send_error(send, ApiError(
                    401, "missing or wrong API key; send the header Authorization: Bearer KEY",
                    "authentication_error", code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"www-authenticate", b"Bearer")]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes, before reading it when its length is
    declared."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise ApiError(400, "the body is not JSON (send Content-Type: application/json and "
                            "a JSON object)") from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes or more; this server takes at "
                         f"most {limit} (shorten the prompt or the conversation)",
                    code="body_too_large")
