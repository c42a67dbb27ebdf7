"""The Starlette application: routes, middleware and error handlers; its start-up and shut-down
are `server.lifespan`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from server.http.auth import BearerAuth
from server.http.console import console_routes
from server.http.errors import EXCEPTION_HANDLERS
from server.http.metrics import Metrics, RouteNames, metrics_route
from server.http.middleware import (
    REQUEST_ID_HEADER,
    BodySizeLimit,
    ConcurrencyLimit,
    MaxTokensCeiling,
    RequestContextMiddleware,
)
from server.http.probes import probe_routes
from server.http.routing import flagged_paths
from server.lifespan import lifespan
from server.limits import Limits
from server.openai import routes as routes_openai
from server.openai.tokenize import tokenize_routes
from server.openapi import openapi_route
from server.state import ServerState

if TYPE_CHECKING:
    from server.wiring import Stateful


def create_app(
    state: ServerState, *, api_key: str | None = None, extra_routes: list[BaseRoute] | None = None,
    admin_key: str | None = None, protect_metrics: bool = False, limits: Limits | None = None,
    metrics: Metrics | None = None, allowed_origins: list[str] | None = None, stateful: Stateful | None = None,
) -> Starlette:
    """The app serving `state`'s engine.

    api_key:         when set, /v1 routes need `Authorization: Bearer <api_key>` (401 otherwise).
    extra_routes:    routes other packages mount (admin, fine-tuning jobs).
    admin_key:       when set, the admin routes (adapters, files, fine-tuning) need it instead (server/auth.py).
    protect_metrics: /metrics needs a key too (it is open by default, like /health and /ready).
    limits:          request limits (server/middleware.py); default: only the body size.
    metrics:         what /metrics serves (default: a fresh registry for this app).
    allowed_origins: browser origins allowed by CORS (["*"]: any); default none, no CORS headers at all.
    stateful:        what `quiver serve` keeps across restarts (server.wiring.build_stateful): its routes
                     are mounted, and it starts and stops with the app (server/lifespan.py).
    """
    limits = limits or Limits()
    metrics = metrics or Metrics()
    state.limits, state.metrics = limits, metrics  # the generation pipeline reads them per request
    if stateful is not None:
        extra_routes = [*stateful.routes, *(extra_routes or [])]

    routes: list[BaseRoute] = [
        *probe_routes(),
        openapi_route(),  # the document of exactly the routes this app mounts
        metrics_route(state, metrics),
        *console_routes(),  # the web console, open: it asks for a key and sends it with its API calls
        *routes_openai.routes,
        *tokenize_routes(),
        *(extra_routes or []),
    ]
    metrics.route_name = RouteNames(routes)
    # Outermost first: every request gets its id; refusals cost the least work they can.
    middleware = [Middleware(RequestContextMiddleware, track=metrics.track_http,
                             quiet=flagged_paths(routes, "quiet"))]
    if allowed_origins:  # before auth: a browser's preflight carries no key
        middleware.append(Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER]))
    if api_key or admin_key:
        middleware.append(Middleware(BearerAuth, api_key=api_key, admin_key=admin_key,
                                     protect_metrics=protect_metrics))
    if limits.max_request_bytes:
        middleware.append(Middleware(BodySizeLimit, max_bytes=limits.max_request_bytes,
                                     exempt=flagged_paths(routes, "upload")))
    if limits.max_concurrent_requests:
        middleware.append(Middleware(ConcurrencyLimit, max_concurrent=limits.max_concurrent_requests,
                                     paths=flagged_paths(routes, "generation")))
    if limits.max_tokens:
        middleware.append(Middleware(MaxTokensCeiling, limits=limits, paths=flagged_paths(routes, "generation")))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                    lifespan=lifespan(state, stateful))
    app.state.quiver = state
    app.state.metrics = metrics
    return app
