"""Bearer-token authentication for the /v1 routes (liveness and readiness stay open)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError

PROTECTED_PREFIX = "/v1/"


class BearerAuth:
    """Pure ASGI middleware: it never wraps the body, so streaming and disconnects pass through."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                response = APIError(401, "Invalid or missing API key (expected `Authorization: Bearer ...`).",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
