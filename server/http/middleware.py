"""ASGI middleware around every request: request id and access log, body size, concurrency, max_tokens.

All pure ASGI (never Starlette's BaseHTTPMiddleware), so streamed bodies and client
disconnects pass straight through. Refusals use the OpenAI error envelope: 413 for a body
over the limit, 429 with Retry-After when the generation routes are at their concurrency
cap, 400 for a `max_tokens` over the ceiling. Every limit is decided in server/limits.py; the
prompt-token limit and the ceiling's default need the tokenized request and are applied around
the engine call (server/openai/metered.py). Which paths each one watches comes from the route
table's flags (`server.http.routing.flagged_paths`): generation routes, uploads, quiet probes.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http import off_loop
from server.http.errors import RETRY_AFTER_SECONDS, APIError
from server.http.logging import RequestContext, current_request
from server.limits import MAX_TOKENS_FIELDS, Limits

access_log = logging.getLogger("quiver.access")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(headers: Headers) -> str:
    """The client's `x-request-id` if it is short and plain, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """Gives each request an id (echoed in `x-request-id`) and logs it when done.

    track: called as a request starts; what it returns is called with the status and the seconds
    taken when the request is done (server.http.metrics.Metrics.track_http).
    quiet: paths logged at debug level (probes and scrapes would drown the access log at info).
    """

    def __init__(self, app: ASGIApp, track: Callable[[Scope], Callable[[int, float], None]] | None = None,
                 quiet: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.track = track
        self.quiet = quiet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(request_id_from(Headers(scope=scope)))
        token = current_request.set(context)
        done = self.track(scope) if self.track is not None else None
        status = 500  # unless a response starts: the app raised

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = context.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - context.started
            path, client = scope.get("path", ""), scope.get("client")
            access_log.log(
                logging.DEBUG if path in self.quiet else logging.INFO,
                "%s %s %d %.1fms", scope.get("method"), path, status, elapsed * 1000,
                extra={"method": scope.get("method"), "path": path, "status": status,
                       "duration_ms": round(elapsed * 1000, 3), "client": client[0] if client else None},
            )
            if done is not None:
                done(status, elapsed)
            current_request.reset(token)


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, or as a chunked body grows past it.

    exempt: the upload paths, which have their own, larger cap (training.files.FileStore).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the {self.max_bytes} bytes this server accepts.",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.max_bytes or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read, so the app's error handler answers it.
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


class ConcurrencyLimit:
    """429 with Retry-After while `max_concurrent` requests are in flight on the generation routes (`paths`)."""

    def __init__(self, app: ASGIApp, max_concurrent: int, paths: frozenset[str]) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.paths = paths
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.max_concurrent or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            error = APIError(429, f"The server is handling its limit of {self.max_concurrent} concurrent "
                             "requests; retry shortly.", code="too_many_concurrent_requests",
                             headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            await error.response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class MaxTokensCeiling:
    """400 when a request to a generation route (`paths`) asks for more than the `max_tokens` ceiling
    (`Limits.over_ceiling`).

    Reads the (size-limited) body once and replays it to the route; a body that is not a JSON
    object passes through for the route to reject with its own message.
    """

    def __init__(self, app: ASGIApp, limits: Limits, paths: frozenset[str]) -> None:
        self.app = app
        self.limits = limits
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.limits.max_tokens or scope["method"] != "POST"
                or scope["path"] not in self.paths):
            await self.app(scope, receive, send)
            return
        try:
            body, ended = await _read_body(receive)
        except APIError as exc:  # the body limit, raised from below
            await exc.response()(scope, receive, send)
            return
        if not ended:  # the client left mid-body: nobody to answer
            return
        # A large body is decoded on a worker thread: decoding megabytes would stall the event loop.
        error = await off_loop.run_off_loop(self._check, body) if off_loop.is_large(body) else self._check(body)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check(self, body: bytes) -> APIError | None:
        try:
            data = off_loop.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        for field in MAX_TOKENS_FIELDS:
            error = self.limits.over_ceiling(field, data.get(field))
            if error is not None:
                return error
        return None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body, and False if the client left before sending all of it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, as the route expects

    return replay
