"""Admin routes of the adapter registry: list, inspect, register, promote, demote, delete.

Errors use the OpenAI envelope: 400 for a bad name or source and for an adapter that failed
validation (the reason is the message), 404 for an unknown adapter, 409 for a name already taken,
a reserved name (the base model's, or fine-tuning's `ft-` names, which only a job publishes) or a
pin that would leave no GPU slot for unpinned adapters.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.errors import AdapterError
from adapters.registry import AdapterExistsError, PinLimitError
from adapters.sources import AdapterSourceError, validate_name
from engine.errors import AdapterFailedError, UnknownAdapterError
from server.http.errors import APIError, bad_request, parse_json_body
from server.http.routing import ApiRoute, Operation, Param
from server.state import ServerState
from training.job_record import fine_tuned_model_name

# Fine-tuning publishes `ft-<job-id>` and `ft-<job-id>:ckpt-<step>`; a client must not take one first.
_FINE_TUNED_PREFIX = fine_tuned_model_name("")
TAG = "Adapters"
# What `adapters.sources.validate_name` accepts (it also refuses `..` anywhere in the name).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NAME_PARAM = Param("name", {"type": "string", "pattern": ADAPTER_NAME_PATTERN}, "path")


class AdapterCreate(BaseModel, extra="forbid"):
    """What `POST /v1/adapters` takes (checked by `register_adapter`, which names the field at fault)."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="Also without '..' anywhere.")
    source: str = Field(description="A directory relative to the adapter root, or `hf://org/name[@revision]`.")


class Adapter(BaseModel):
    """An `adapter`: its state and tier (`registered`, `loading`, `host`, `gpu`, `pinned`, `failed`)."""

    id: str
    object: Literal["adapter"]
    state: str
    tier: str
    pinned: bool
    source: str
    error: str | None
    rank: int | None = None
    targets: list[str] = []
    size_bytes: int | None = None
    in_flight: int = 0
    load_ms: dict[str, float] = {}


class AdapterList(BaseModel):
    """The registered adapters, by name."""

    object: Literal["list"]
    data: list[Adapter]


class AdapterDeleted(BaseModel):
    """The adapter is unregistered; `in_flight` requests still finish with it."""

    id: str
    object: Literal["adapter"]
    deleted: Literal[True]
    in_flight: int


def adapter_routes(state: ServerState) -> list[ApiRoute]:
    """The `/v1/adapters` routes over `state`'s engine."""

    async def list_adapters(request: Request) -> Response:
        engine = state.require_engine()
        return JSONResponse({"object": "list", "data": await engine.list_adapters()})

    async def get_adapter(request: Request) -> Response:
        engine, name = _engine_and_name(state, request)
        return JSONResponse(await _guard(engine.adapter_info(name), name))

    async def register_adapter(request: Request) -> Response:
        engine = state.require_engine()
        body = await parse_json_body(request)
        unknown = sorted(set(body) - set(AdapterCreate.model_fields))
        if unknown:
            raise bad_request(f"Unknown field `{unknown[0]}`; expected `name` and `source`.", param=unknown[0])
        name, source = body.get("name"), body.get("source")
        if not isinstance(name, str):
            raise bad_request("`name` is required and must be a string.", param="name")
        if not isinstance(source, str):
            raise bad_request("`source` is required and must be a string.", param="source")
        _check_name(name)
        _check_not_reserved(name, engine.model_name)
        info = await _guard(engine.register_adapter(name, source), name, param="source")
        return JSONResponse(info, status_code=201)

    async def promote(request: Request) -> Response:
        engine, name = _engine_and_name(state, request)
        return JSONResponse(await _guard(engine.promote_adapter(name), name))

    async def demote(request: Request) -> Response:
        engine, name = _engine_and_name(state, request)
        return JSONResponse(await _guard(engine.demote_adapter(name), name))

    async def delete(request: Request) -> Response:
        engine, name = _engine_and_name(state, request)
        return JSONResponse(await _guard(engine.delete_adapter(name), name))

    def change(summary: str, answer: type[BaseModel], *errors: int, journal: str | None = None) -> Operation:
        return Operation(summary, TAG, response=answer, errors=(400, 404, *errors, 503), missing="adapter",
                         params=(_NAME_PARAM,), journal=journal)

    one = "/v1/adapters/{name}"
    return [
        ApiRoute("/v1/adapters", list_adapters, Operation(
            "List the registered adapters with their state and tier", TAG, response=AdapterList, errors=(503,)),
            methods=["GET"]),
        ApiRoute("/v1/adapters", register_adapter, Operation(
            "Register an adapter", TAG, body=AdapterCreate, response=Adapter, status=201, errors=(400, 409, 503),
            journal="register"), methods=["POST"]),
        ApiRoute(one, get_adapter, change("Describe one adapter", Adapter), methods=["GET"]),
        ApiRoute(one, delete, change("Delete an adapter (waits for its requests in flight)", AdapterDeleted,
                                     journal="delete"), methods=["DELETE"]),
        ApiRoute(one + "/promote", promote, change("Load an adapter into a GPU slot and pin it", Adapter, 409,
                                                   journal="pin"), methods=["POST"]),
        ApiRoute(one + "/demote", demote, change("Unpin an adapter and move it to host memory", Adapter,
                                                 journal="unpin"), methods=["POST"]),
    ]


def _engine_and_name(state: ServerState, request: Request) -> tuple[Any, str]:
    engine = state.require_engine()
    return engine, _check_name(request.path_params["name"])


def _check_name(name: str) -> str:
    try:
        return validate_name(name)
    except AdapterSourceError as exc:
        raise bad_request(str(exc), param="name", code="invalid_adapter_name") from None


def _check_not_reserved(name: str, base_model: str) -> None:
    if name == base_model:
        reason = "it is the base model's name, which always serves the base model"
    elif name.startswith(_FINE_TUNED_PREFIX):
        reason = f"names starting with {_FINE_TUNED_PREFIX!r} are reserved for fine-tuning jobs' adapters"
    else:
        return
    raise APIError(409, f"The adapter name `{name}` is reserved: {reason}.", param="name", code="reserved_name")


async def _guard(work: Awaitable[Any], name: str, param: str | None = None) -> Any:
    """Await an engine adapter call, mapping its errors to statuses."""
    try:
        return await work
    except UnknownAdapterError:
        raise APIError(404, f"The adapter `{name}` does not exist.", param="name", code="adapter_not_found") from None
    except AdapterFailedError as exc:
        raise bad_request(str(exc), param=param, code="adapter_failed") from None
    except (AdapterExistsError, PinLimitError) as exc:
        raise APIError(409, str(exc), param="name", code="conflict") from None
    except AdapterSourceError as exc:
        raise bad_request(str(exc), param="source", code="invalid_source") from None
    except AdapterError as exc:
        raise bad_request(str(exc), param=param, code="adapter_invalid") from None
