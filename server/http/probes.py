"""`GET /health` and `GET /ready`: what an orchestrator polls (open, and logged at debug level)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.http.routing import ApiRoute, Operation
from server.state import ServerState

TAG = "Probes"


class Health(BaseModel):
    """The process answers and, once started, the engine thread is alive (503 with the reason if not)."""

    status: Literal["ok", "unhealthy"]
    reason: str | None = None


class Ready(BaseModel):
    """The model is loaded and serves requests."""

    status: Literal["ready"]
    model: str


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


def probe_routes() -> list[ApiRoute]:
    return [
        ApiRoute("/health", health, Operation("Liveness", TAG, response=Health, answers=((503, Health),),
                                                     quiet=True),
                 methods=["GET"]),
        ApiRoute("/ready", ready, Operation("Readiness", TAG, response=Ready, errors=(503,), quiet=True),
                 methods=["GET"]),
    ]
