"""The OpenAPI 3.1 document, written from the route table (`server.http.routing`).

Every path, method, parameter, body and answer comes from the `ApiRoute`s the app mounts and every
schema from the pydantic models they name, so the document cannot drift from the routes. A model
is listed under its title (`class JobCreate(BaseModel, title="FineTuningJobCreate")`), so private
class names stay private. Every 4xx and 5xx is the OpenAI error envelope (`Error`). Streaming
routes list `text/event-stream` with the schema of one event, as OpenAI's own document does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from server.http.routing import ApiRoute, Error, Operation, api_routes
from server.version import VERSION

OPENAPI_PATH = "/openapi.json"
_REF = "#/components/schemas/{model}"
_REASONS = {400: "Invalid request", 401: "Missing or wrong API key", 409: "Conflict with the current state",
            413: "Too large", 429: "Overloaded (see Retry-After)", 503: "Model not loaded yet"}
_TAGS = {"OpenAI": "The OpenAI API: chat, completions, models, the Responses API.",
         "vLLM": "vLLM's tokenizer routes and the version.",
         "Probes": "Liveness and readiness.",
         "Adapters": "The adapter registry: register, pin to a GPU slot, delete.",
         "Fine-tuning": "OpenAI's files and fine-tuning jobs.",
         "SeekrFlow": "The routes the `seekrai` SDK calls."}


def schema_name(model: type[BaseModel]) -> str:
    """The name a model has in the document: its title, else its class name."""
    return str(model.model_config.get("title") or model.__name__)


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=schema_name(model))}


def _models(operations: Iterable[Operation]) -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {Error: None}
    for op in operations:
        for model in (*op.bodies(), op.form, op.response, op.stream, *(model for _, model in op.answers)):
            if model is not None:
                found[model] = None
    return list(found)


def components(models: list[type[BaseModel]]) -> dict[str, Any]:
    """`components/schemas` for `models` and every model they use, each under its title."""
    _, defs = models_json_schema([(model, "validation") for model in models], ref_template=_REF)
    found = defs.get("$defs", {})
    names = {key: str(schema.get("title") or key) for key, schema in found.items()}
    if len(set(names.values())) != len(names):
        clashes = sorted(name for name in names.values() if list(names.values()).count(name) > 1)
        raise ValueError(f"two models share a schema name: {clashes}")
    refs = {_REF.format(model=key): _REF.format(model=name) for key, name in names.items()}

    def renamed(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: refs.get(value, value) if key == "$ref" else renamed(value) for key, value in node.items()}
        if isinstance(node, list):
            return [renamed(item) for item in node]
        return node

    return {names[key]: renamed(schema) for key, schema in found.items()}


def _request_body(op: Operation) -> dict[str, Any] | None:
    if op.form is not None:
        return {"required": True, "content": {"multipart/form-data": {"schema": _ref(op.form)}}}
    bodies = op.bodies()
    if not bodies:
        return None
    schema = _ref(bodies[0]) if len(bodies) == 1 else {"anyOf": [_ref(model) for model in bodies]}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _description(model: type[BaseModel] | None) -> str:
    doc = (model.__doc__ or "").strip() if model is not None else ""
    return doc.split("\n\n")[0].replace("\n", " ") if doc else "OK"


def _responses(op: Operation) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": _description(op.response)}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": _ref(op.response)}}
    if op.stream is not None:
        ok["content"] = {**ok.get("content", {}), "text/event-stream": {"schema": _ref(op.stream)}}
        ok["description"] += (f" With `stream: true`, server-sent events, each `data:` one `{schema_name(op.stream)}`"
                              " (the Chat and Completions streams end with `data: [DONE]`).")
    reasons = {**_REASONS, 404: f"Unknown {op.missing}"}
    error = {"application/json": {"schema": _ref(Error)}}
    return {str(op.status): ok,
            **{str(status): {"description": reasons[status], "content": error} for status in op.errors},
            **{str(status): {"description": _description(model),
                             "content": {"application/json": {"schema": _ref(model)}}} for status, model in op.answers}}


def _operation(route: ApiRoute, method: str) -> dict[str, Any]:
    op = route.operation
    operation: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                 "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{method} {route.path_format}").strip("_").lower(),
                                 "responses": _responses(op)}
    params = [{"name": p.name, "in": p.where, "required": p.where == "path", "schema": p.schema,
               **({"description": p.description} if p.description else {})}
              for p in [*route.path_params(), *(p for p in op.params if p.where == "query")]]
    if params:
        operation["parameters"] = params
    body = _request_body(op)
    if body is not None:
        operation["requestBody"] = body
    return operation


def build_openapi(routes: Iterable[BaseRoute], version: str = VERSION) -> dict[str, Any]:
    """The document of the documented `ApiRoute`s among `routes`, no more."""
    table = [route for route in api_routes(routes) if route.include_in_schema]
    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        for method in route.declared_methods:
            paths.setdefault(route.path_format, {})[method.lower()] = _operation(route, method)
    tags = sorted({route.operation.tag for route in table}, key=list(_TAGS).index)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quiver", "version": version,
                 "description": "OpenAI-compatible multi-LoRA inference server."},
        "tags": [{"name": tag, "description": _TAGS[tag]} for tag in tags],
        "paths": paths,
        "components": {"schemas": components(_models(route.operation for route in table))},
    }


async def _serve_openapi(request: Request) -> Response:
    """The document of the routes this app mounts, written on the first request."""
    document = getattr(request.app.state, "openapi", None)
    if document is None:
        document = request.app.state.openapi = build_openapi(request.app.routes)
    return JSONResponse(document)


def openapi_route() -> ApiRoute:
    return ApiRoute(OPENAPI_PATH, _serve_openapi, Operation("The OpenAPI document", "Probes"), methods=["GET"],
                    documented=False)
