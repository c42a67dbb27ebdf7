"""The OpenAPI 3 document of the routes `quiver serve` mounts.

Request bodies the routes validate with pydantic are described by those models; the others
(adapter registration, multipart uploads) by small schemas matching what their handlers accept.
Every 4xx and 5xx a route can answer is the OpenAI error envelope (`Error`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Route

from server.finetune.routes import JobCreate
from server.openai.schemas import ChatCompletionRequest, CompletionRequest
from server.openai.tokenize import Detokenize, TokenizeChat, TokenizeCompletion
from server.seekrflow.bodies import (
    DeploymentCreate,
    FineTuneCreate,
    InfrastructureConfig,
    LoRAConfig,
    ProjectCreate,
    TrainingConfig,
)

_REF_TEMPLATE = "#/components/schemas/{model}"
_SQL_MAX = 2**63 - 1  # the largest id, offset or count the `/v1/flow` routes take (SQLite's INTEGER)

# The route modules keep their body models private; the document names them publicly.
_MODELS: dict[type[BaseModel], str] = {
    ChatCompletionRequest: "ChatCompletionRequest",
    CompletionRequest: "CompletionRequest",
    TokenizeCompletion: "TokenizeCompletionRequest",
    TokenizeChat: "TokenizeChatRequest",
    Detokenize: "DetokenizeRequest",
    JobCreate: "FineTuningJobCreate",
    ProjectCreate: "FlowProjectCreate",
    DeploymentCreate: "FlowDeploymentCreate",
    FineTuneCreate: "FlowFineTuneCreate",
    TrainingConfig: "FlowTrainingConfig",
    LoRAConfig: "FlowLoRAConfig",
    InfrastructureConfig: "FlowInfrastructureConfig",
}

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

# What `adapters.sources.validate_name` accepts (it also refuses `..` anywhere in the name).
_ADAPTER_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}

_ADAPTER_CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "source"],
    "properties": {
        "name": _ADAPTER_NAME,
        "source": {"type": "string", "description": "A directory relative to the adapter root, or "
                                                    "`hf://org/name[@revision]`."},
    },
}

_FILE_UPLOAD: dict[str, Any] = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "Chat JSONL."},
                   "purpose": {"type": "string", "enum": ["fine-tune"]}},
}

_FLOW_FILE_UPLOAD: dict[str, Any] = {
    "type": "object",
    "required": ["files"],
    "properties": {"files": {"type": "string", "format": "binary", "description": "Chat JSONL."},
                   "filename": {"type": "string"},
                   "purpose": {"type": "string", "enum": ["fine-tune"]}},
}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}
_RESPONSE_INPUT_ITEM: dict[str, Any] = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"enum": ["message"]}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"enum": ["function_call"]}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "The arguments as JSON text."}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"enum": ["function_call_output"]}, "call_id": {"type": "string"}, "output": {"type": "string"}}},
]}
_RESPONSE_CREATE: dict[str, Any] = {
    "type": "object",
    "description": "A Responses API request, answered over the chat completions path. Reasoning, background "
                   "responses, built-in tools, `include`, conversations, prompt templates and truncation are "
                   "refused with 400.",
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 2048, "items": _RESPONSE_INPUT_ITEM}]},
        "instructions": {"type": ["string", "null"]},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"enum": ["function"]}, "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$"},
            "description": {"type": "string"}, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"],
            "properties": {"type": {"enum": ["function"]}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "text": {"type": "object", "properties": {"format": {"oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "name", "schema"], "properties": {
                "type": {"enum": ["json_schema"]}, "name": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean"}}}]}}},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "stream": {"type": "boolean"},
        "store": {"type": "boolean", "default": True},
        "previous_response_id": {"type": ["string", "null"], "maxLength": 256},
        "metadata": {"type": "object", "maxProperties": 16, "additionalProperties": {"type": "string",
                                                                                      "maxLength": 512}},
        "user": {"type": "string"},
    },
}

_REASONS = {400: "Invalid request", 401: "Missing or wrong API key", 409: "Conflict with the current state",
            413: "Too large", 429: "Overloaded (see Retry-After)", 503: "Model not loaded yet"}


def _errors(statuses: Iterable[int], missing: str) -> dict[str, Any]:
    reasons = {**_REASONS, 404: f"Unknown {missing}"}
    return {
        str(status): {
            "description": reasons[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def _op(summary: str, *, errors: Iterable[int] = (), missing: str = "resource", status: int = 200,
        ok: str = "The object", body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {
        str(status): {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}},
        **_errors(errors, missing),
    }}
    if body is not None:
        operation["requestBody"] = body
    if params:
        operation["parameters"] = params
    return operation


def _json(model: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": _REF_TEMPLATE.format(model=model)}}}}


def _multipart(model: str) -> dict[str, Any]:
    return {"required": True,
            "content": {"multipart/form-data": {"schema": {"$ref": _REF_TEMPLATE.format(model=model)}}}}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _count(low: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": _SQL_MAX}


_PAGE = [_query("after", {"type": "string"}), _query("limit", {"type": "integer", "minimum": 1, "maximum": 100})]
_SKIP_LIMIT = [_query("skip", _count(0)), _query("limit", _count(1))]


def _generation(summary: str, model: str, object_name: str) -> dict[str, Any]:
    operation = _op(summary, errors=(400, 404, 429, 503), missing="model", body=_json(model))
    operation["responses"]["200"] = {
        "description": f"A `{object_name}` object, or server-sent `{object_name}.chunk` events ending with "
                       "`data: [DONE]` when `stream` is true.",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}},
    }
    return operation


def _responses_create() -> dict[str, Any]:
    operation = _op("Create a response (the Responses API)", errors=(400, 404, 429, 503), missing="model or response",
                    body=_json("ResponseCreate"))
    operation["responses"]["200"] = {
        "description": "A `response` object, or typed server-sent events (`response.created` ... "
                       "`response.completed`) when `stream` is true.",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}},
    }
    return operation


def _openai_paths() -> dict[str, dict[str, Any]]:
    return {
        "/v1/chat/completions": {"post": _generation("Create a chat completion", "ChatCompletionRequest",
                                                     "chat.completion")},
        "/v1/completions": {"post": _generation("Create a (legacy) text completion", "CompletionRequest",
                                                "text_completion")},
        "/v1/responses": {"post": _responses_create()},
        "/v1/responses/{response_id}": {
            "get": _op("Retrieve a stored response", ok="A `response` object", errors=(404,), missing="response",
                       params=[_path("response_id")]),
            "delete": _op("Delete a stored response", ok="`{id, object, deleted}`", errors=(404,), missing="response",
                          params=[_path("response_id")])},
        "/v1/responses/{response_id}/input_items": {"get": _op(
            "List a stored response's input items", ok="A list of input items", errors=(400, 404),
            missing="response", params=[_path("response_id"), _query("order", {"enum": ["asc", "desc"]}),
                                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                                        _query("after", {"type": "string"})])},
        "/v1/models": {"get": _op("List the base model and its adapters", ok="A list of models", errors=(503,))},
        "/v1/models/{model}": {"get": _op("Describe one model (the base or an adapter)", ok="A model",
                                          errors=(404, 503), missing="model", params=[_path("model")])},
        "/tokenize": {"post": _op(
            "Tokenize a prompt, or a conversation as chat completions render it (vLLM's shape)",
            ok="`{count, max_model_len, tokens}`", errors=(400, 404, 503), missing="model", body={
                "required": True, "content": {"application/json": {"schema": {"anyOf": [
                    {"$ref": _REF_TEMPLATE.format(model="TokenizeCompletionRequest")},
                    {"$ref": _REF_TEMPLATE.format(model="TokenizeChatRequest")}]}}}})},
        "/detokenize": {"post": _op("Turn token ids back into text (vLLM's shape)", ok="`{prompt}`",
                                    errors=(400, 404, 503), missing="model", body=_json("DetokenizeRequest"))},
        "/version": {"get": _op("Quiver's version", ok="`{version}`")},
        "/health": {"get": _op("Liveness", ok="The process is up", errors=(503,))},
        "/ready": {"get": _op("Readiness", ok="The model is loaded", errors=(503,))},
    }


def _adapter_paths() -> dict[str, dict[str, Any]]:
    name = [_path("name", _ADAPTER_NAME)]

    def change(summary: str, *errors: int) -> dict[str, Any]:
        return _op(summary, ok="The adapter", errors=(400, 404, *errors, 503), missing="adapter", params=name)

    return {
        "/v1/adapters": {
            "get": _op("List the registered adapters with their state and tier", ok="A list of adapters",
                       errors=(503,)),
            "post": _op("Register an adapter", status=201, ok="The registered adapter", errors=(400, 409, 503),
                        body=_json("AdapterCreate")),
        },
        "/v1/adapters/{name}": {"get": change("Describe one adapter"),
                                "delete": change("Delete an adapter (waits for its requests in flight)")},
        "/v1/adapters/{name}/promote": {"post": change("Load an adapter into a GPU slot and pin it", 409)},
        "/v1/adapters/{name}/demote": {"post": change("Unpin an adapter and move it to host memory")},
    }


def _finetune_paths() -> dict[str, dict[str, Any]]:
    jobs, job = "/v1/fine_tuning/jobs", [_path("job_id")]
    return {
        "/v1/files": {
            "post": _op("Upload a fine-tuning file (checked on arrival)", ok="A `file` object", errors=(400, 413),
                        body=_multipart("FileUpload")),
            "get": _op("List the uploaded files", ok="A list of files", params=[_query("purpose", {"type": "string"})]),
        },
        "/v1/files/{file_id}": {"get": _op("Describe one file", ok="A `file` object", errors=(404,),
                                           missing="file", params=[_path("file_id")])},
        jobs: {
            "post": _op("Create a fine-tuning job", ok="A `fine_tuning.job` object", errors=(400, 404),
                        missing="file", body=_json("FineTuningJobCreate")),
            "get": _op("List fine-tuning jobs, newest first", ok="A page of jobs", errors=(400,), params=_PAGE),
        },
        jobs + "/{job_id}": {"get": _op("Describe one job", ok="A `fine_tuning.job` object", errors=(404,),
                                        missing="job", params=job)},
        jobs + "/{job_id}/events": {"get": _op("List a job's events", ok="A page of events", errors=(400, 404),
                                               missing="job", params=job + _PAGE)},
        jobs + "/{job_id}/checkpoints": {"get": _op("List a job's checkpoints", ok="A page of checkpoints",
                                                    errors=(400, 404), missing="job", params=job + _PAGE)},
        jobs + "/{job_id}/cancel": {"post": _op("Cancel a job", ok="The job", errors=(404, 409), missing="job",
                                                params=job)},
    }


def _flow_paths() -> dict[str, dict[str, Any]]:
    flow = "/v1/flow"
    job, deployment = [_path("job_id")], [_path("deployment_id")]
    upload = _op("Upload a fine-tuning file", ok="A file", errors=(400, 413), body=_multipart("FlowFileUpload"))
    cancel = _op("Cancel a fine-tune", ok="The fine-tune", errors=(404, 409), missing="fine-tune", params=job)
    promote = _op("Promote a deployment (pin its adapter)", ok="The deployment", errors=(404, 409, 503),
                  missing="deployment", params=deployment)
    demote = _op("Demote a deployment (unpin its adapter)", ok="The deployment", errors=(404, 503),
                 missing="deployment", params=deployment)
    return {
        f"{flow}/projects": {
            "get": _op("List projects", ok="A list of projects", errors=(400,), params=_SKIP_LIMIT),
            "post": _op("Create a project", ok="The project", errors=(400,), body=_json("FlowProjectCreate")),
        },
        f"{flow}/projects/{{project_id}}": {"get": _op(
            "Describe one project", ok="The project", errors=(404,), missing="project",
            params=[_path("project_id", _count(0))])},
        f"{flow}/files": {
            "put": upload, "post": upload,
            "get": _op("List files", ok="A list of files", errors=(400,), params=[
                _query("offset", _count(0)), _query("limit", _count(1)),
                _query("purpose", {"type": "string"})]),
        },
        f"{flow}/files/{{file_id}}": {"get": _op("Describe one file", ok="A file", errors=(404,), missing="file",
                                                 params=[_path("file_id")])},
        f"{flow}/fine-tune": {"post": _op("Create a fine-tune in a project", ok="The fine-tune", errors=(400, 404),
                                          missing="project or file", body=_json("FlowFineTuneCreate"))},
        f"{flow}/fine-tunes": {"get": _op("List fine-tunes", ok="A list of fine-tunes")},
        f"{flow}/fine-tunes/{{job_id}}": {"get": _op("Describe one fine-tune", ok="The fine-tune", errors=(404,),
                                                     missing="fine-tune", params=job)},
        f"{flow}/fine-tunes/{{job_id}}/events": {"get": _op("List a fine-tune's events, oldest first",
                                                            ok="A list of events", errors=(404,),
                                                            missing="fine-tune", params=job)},
        f"{flow}/fine-tunes/{{job_id}}/cancel": {"put": cancel, "post": cancel},
        f"{flow}/deployments": {
            "get": _op("List deployments", ok="A list of deployments", errors=(400, 503), params=_SKIP_LIMIT),
            "post": _op("Create a deployment of a fine-tune, adapter or the base model", ok="The deployment",
                        errors=(400, 404, 503), missing="model", body=_json("FlowDeploymentCreate")),
        },
        f"{flow}/deployments/{{deployment_id}}": {"get": _op("Describe one deployment", ok="The deployment",
                                                             errors=(404, 503), missing="deployment",
                                                             params=deployment)},
        f"{flow}/deployments/{{deployment_id}}/promote": {"put": promote, "post": promote},
        f"{flow}/deployments/{{deployment_id}}/demote": {"put": demote, "post": demote},
        f"{flow}/models": {"get": _op("List the base model and its servable adapters", ok="A list of models",
                                      errors=(503,))},
        "/v1/inference/chat/completions": {"post": _generation(
            "Create a chat completion (`model` may also name a deployment or a fine-tune)", "ChatCompletionRequest",
            "chat.completion")},
    }


def _component_schemas() -> dict[str, Any]:
    _, defs = models_json_schema([(model, "validation") for model in _MODELS], ref_template=_REF_TEMPLATE)
    # pydantic names a definition after its class; rename the private ones (and every $ref to them).
    renames = {model.__name__: public for model, public in _MODELS.items() if model.__name__ != public}
    refs = {_REF_TEMPLATE.format(model=old): _REF_TEMPLATE.format(model=new) for old, new in renames.items()}

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: refs.get(value, value) if key == "$ref" else rename(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rename(item) for item in node]
        return node

    schemas = {renames.get(name, name): {**rename(schema), "title": renames.get(name, name)}
               for name, schema in defs.get("$defs", {}).items()}
    schemas.update(AdapterCreate=_ADAPTER_CREATE, FileUpload=_FILE_UPLOAD, FlowFileUpload=_FLOW_FILE_UPLOAD,
                   Error=_ERROR_SCHEMA, ResponseCreate=_RESPONSE_CREATE)
    return schemas


def _openapi_path(route: Route) -> str:
    # Starlette's `{name:convertor}` is OpenAPI's `{name}`.
    return re.sub(r"\{([^}:]+):[^}]+\}", r"{\1}", route.path)


def _mounted(paths: dict[str, dict[str, Any]], routes: Iterable[BaseRoute]) -> dict[str, dict[str, Any]]:
    served = {(_openapi_path(r), method.lower()) for r in routes if isinstance(r, Route) for method in r.methods or ()}
    kept: dict[str, dict[str, Any]] = {}
    for path, operations in paths.items():
        found = {method: op for method, op in operations.items() if (path, method) in served}
        if found:
            kept[path] = found
    return kept


def build_openapi(version: str = "0.1.0", routes: Iterable[BaseRoute] | None = None) -> dict[str, Any]:
    """The document; with `routes`, only the operations among them (default: all `quiver serve` mounts)."""
    paths = {**_openai_paths(), **_adapter_paths(), **_finetune_paths(), **_flow_paths()}
    if routes is not None:
        paths = _mounted(paths, routes)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quiver", "version": version,
                 "description": "OpenAI-compatible multi-LoRA inference server."},
        "paths": paths,
        "components": {"schemas": _component_schemas()},
    }
