"""The Starlette application: routes, error handlers, and the engine's lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server import routes_openai
from server.auth import BearerAuth
from server.errors import EXCEPTION_HANDLERS
from server.openapi import build_openapi
from server.state import ServerState


async def health(request: Request) -> Response:
    """Liveness: the process answers and, once started, the engine thread is alive."""
    engine = getattr(request.app.state.quiver, "engine", None)
    failure = getattr(engine, "failure", None) if engine is not None else None
    if failure:
        return JSONResponse({"status": "unhealthy", "reason": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state: ServerState = request.app.state.quiver
    state.require_engine()  # 503 in the error envelope until the model is loaded
    return JSONResponse({"status": "ready", "model": state.engine.model_name})


def create_app(
    state: ServerState, *, api_key: str | None = None, extra_routes: list[BaseRoute] | None = None
) -> Starlette:
    """The app serving `state`'s engine.

    api_key:      when set, /v1 routes need `Authorization: Bearer <api_key>` (401 otherwise).
    extra_routes: routes other packages mount (admin, metrics, fine-tuning jobs).
    """
    document = build_openapi()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *routes_openai.routes,
        *(extra_routes or []),
    ]
    middleware = [Middleware(BearerAuth, api_key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                    lifespan=lifespan)
    app.state.quiver = state
    return app
