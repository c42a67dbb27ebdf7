"""`GET /v1/models` and `GET /v1/models/{model}`: the base model and every registered adapter."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.openai import protocol
from server.state import ServerState


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.quiver
    engine = state.require_engine()
    base = engine.model_name
    data = [protocol.model_card(base, state.created, base, None)]
    data += [protocol.model_card(name, state.created, base, base) for name in engine.adapter_names()]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    state: ServerState = request.app.state.quiver
    engine = state.require_engine()
    name = request.path_params["model"]
    base = engine.model_name
    await state.discover(name)
    state.resolve_model(name)  # 404 for unknown names
    parent = None if name == base else base
    return JSONResponse(protocol.model_card(name, state.created, base, parent))
