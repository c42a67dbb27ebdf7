"""The OpenAPI 3 document of the routes, generated from the pydantic request models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from server.schemas import ChatCompletionRequest, CompletionRequest

_REF_TEMPLATE = "#/components/schemas/{model}"

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    reasons = {400: "Invalid request", 404: "Unknown model", 429: "Overloaded (see Retry-After)",
               503: "Model not loaded yet"}
    return {
        str(status): {
            "description": reasons[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def _json_body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _generation_op(summary: str, model: str, object_name: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": _json_body(_REF_TEMPLATE.format(model=model)),
            "responses": {
                "200": {
                    "description": f"A `{object_name}` object, or server-sent `{object_name}.chunk` "
                                   "events ending with `data: [DONE]` when `stream` is true.",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}},
                },
                **_error_responses(400, 404, 429, 503),
            },
        }
    }


def _simple_get(summary: str, description: str, *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}},
        **_error_responses(*errors),
    }}}


def _model_get() -> dict[str, Any]:
    operation = _simple_get("Describe one model (the base or an adapter)", "A model", 404, 503)
    operation["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return operation


def build_openapi(version: str = "0.1.0") -> dict[str, Any]:
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
        ref_template=_REF_TEMPLATE,
    )
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = _ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quiver", "version": version,
                 "description": "OpenAI-compatible multi-LoRA inference server."},
        "paths": {
            "/v1/chat/completions": _generation_op("Create a chat completion", "ChatCompletionRequest",
                                                   "chat.completion"),
            "/v1/completions": _generation_op("Create a (legacy) text completion", "CompletionRequest",
                                              "text_completion"),
            "/v1/models": _simple_get("List the base model and its adapters", "A list of models", 503),
            "/v1/models/{model}": _model_get(),
            "/health": _simple_get("Liveness", "The process is up"),
            "/ready": _simple_get("Readiness", "The model is loaded", 503),
        },
        "components": {"schemas": schemas},
    }
