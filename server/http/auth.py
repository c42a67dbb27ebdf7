"""Bearer-token authentication: an inference key for the OpenAI routes, an admin key for the rest.

Route classes:
- admin (adapters, files, fine-tuning jobs, `/v1/flow`): the admin key; without one, the API key;
- inference (every other /v1 route, and vLLM's /tokenize and /detokenize): the API key or the admin key;
- /metrics: open, or, with `protect_metrics`, like an inference route;
- liveness, readiness and the OpenAPI document: always open.
Keys are compared in constant time. A refusal is a 401 in the OpenAI error envelope.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import APIError

PROTECTED_PREFIX = "/v1/"
# Adapters, training data, fine-tuning jobs, and the `seekrai` platform's projects, files,
# fine-tunes and deployments.
ADMIN_PREFIXES = ("/v1/adapters", "/v1/files", "/v1/fine_tuning", "/v1/flow")
METRICS_PATH = "/metrics"
# Inference routes outside /v1 (vLLM's spelling): they run the model's tokenizer on client text.
INFERENCE_PATHS = frozenset({"/tokenize", "/detokenize"})


def is_admin_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ADMIN_PREFIXES)


def bearer_token(headers: Headers) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None.

    A bare `Authorization: <token>` (no scheme, no space) is accepted too: the `seekrai` SDK
    sends its key that way.
    """
    value = headers.get("authorization", "").strip()
    scheme, _, token = value.partition(" ")
    if not token:
        return value.encode() if value and scheme.lower() != "bearer" else None
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


class BearerAuth:
    """Pure ASGI middleware: it never wraps the body, so streaming and disconnects pass through."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, admin_key: str | None = None,
                 protect_metrics: bool = False) -> None:
        if not api_key and not admin_key:
            raise ValueError("give api_key, admin_key or both; neither may be empty")
        self.app = app
        self._api = api_key.encode() if api_key else None
        self._admin = admin_key.encode() if admin_key else None
        self._protect_metrics = protect_metrics

    def _keys_for(self, path: str) -> tuple[bytes, ...]:
        """The keys any one of which opens `path`; none: the path is open."""
        keys: tuple[bytes | None, ...] = ()
        if is_admin_path(path):
            keys = (self._admin or self._api,)
        elif path.startswith(PROTECTED_PREFIX) or path in INFERENCE_PATHS:
            keys = (self._api, self._admin) if self._api else ()  # an admin key alone leaves inference open
        elif path == METRICS_PATH and self._protect_metrics:
            keys = (self._api, self._admin)
        return tuple(key for key in keys if key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            keys = self._keys_for(scope["path"])
            if keys:
                token = bearer_token(Headers(scope=scope))
                # Every key is compared (no early exit), so timing does not tell which one was close.
                matched = [hmac.compare_digest(token or b"", key) for key in keys]
                if token is None or not any(matched):
                    await self._refuse(token is None, scope["path"]).response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _refuse(self, missing: bool, path: str) -> APIError:
        if missing:
            message = "Missing API key: send `Authorization: Bearer <key>`."
        elif is_admin_path(path) and self._admin is not None:
            message = "Invalid admin key: this route needs the admin key (`Authorization: Bearer <admin key>`)."
        else:
            message = "Invalid API key."
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
