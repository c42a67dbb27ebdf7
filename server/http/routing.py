"""The route table: each route says once what Starlette mounts, what the OpenAPI document says and
what the middleware and the adapter journal must know of it.

An `ApiRoute` is a Starlette `Route` carrying an `Operation`: the models of its body and answers,
the error statuses it can give, its query parameters, and flags other parts key on (generation
routes, uploads, quiet probes, adapter changes the journal records). The surfaces list their
`ApiRoute`s; the app mounts them as they are, `server.openapi` writes the document from them, and
the middleware and the journal read their path sets and recorders from the flags, never from a
path written a second time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from starlette.convertors import Convertor, FloatConvertor, IntegerConvertor, UUIDConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

Endpoint = Callable[[Request], Awaitable[Response]]
Flag = Literal["generation", "upload", "quiet"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """The OpenAI error envelope: every 4xx and 5xx answer carries it."""

    error: ErrorDetail


@dataclass(frozen=True)
class Param:
    """A query parameter, or a path parameter's schema where its convertor says too little."""

    name: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    where: Literal["query", "path"] = "query"
    description: str = ""


@dataclass(frozen=True)
class Operation:
    """What a client, the middleware and the journal need to know of one route.

    body:       the JSON body's model (a tuple: any one of them); form: the multipart form's model.
    response:   the model of the success answer, sent with `status`.
    stream:     the model of each server-sent event when the request asks to stream.
    errors:     the 4xx/5xx statuses it can answer, each with the `Error` envelope; `missing`
                says what a 404 did not find.
    answers:    other statuses, each with its own model (a probe's 503 says why in its own shape).
    generation: it runs the model: the concurrency cap and the `max_tokens` ceiling apply.
    upload:     a multipart upload, which has its own larger size cap instead of the body limit.
    quiet:      a probe or scrape, logged at debug level.
    journal:    the adapter change the admin journal records from a successful answer
                ("register", "delete", "pin", "unpin").
    """

    summary: str
    tag: str
    body: type[BaseModel] | tuple[type[BaseModel], ...] | None = None
    form: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    stream: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    missing: str = "resource"
    answers: tuple[tuple[int, type[BaseModel]], ...] = ()
    params: tuple[Param, ...] = ()
    generation: bool = False
    upload: bool = False
    quiet: bool = False
    journal: str | None = None

    def bodies(self) -> tuple[type[BaseModel], ...]:
        return self.body if isinstance(self.body, tuple) else () if self.body is None else (self.body,)


class ApiRoute(Route):
    """A Starlette route with its `Operation`; `documented=False` keeps it out of the OpenAPI document
    (pages, the document itself, the Prometheus text: no JSON API)."""

    def __init__(self, path: str, endpoint: Endpoint, operation: Operation, *, methods: Sequence[str],
                 name: str | None = None, documented: bool = True) -> None:
        super().__init__(path, endpoint, methods=list(methods), name=name, include_in_schema=documented)
        self.operation = operation
        self.declared_methods = tuple(method.upper() for method in methods)  # without Starlette's HEAD
        for param in operation.params:
            if (param.where == "path") != (param.name in self.param_convertors):
                raise ValueError(f"{path}: parameter {param.name!r} is not a {param.where} parameter")

    def with_endpoint(self, endpoint: Endpoint) -> ApiRoute:
        """The same route answered by `endpoint` (a wrapper of this one's)."""
        return ApiRoute(self.path, endpoint, self.operation, methods=self.declared_methods, name=self.name,
                        documented=self.include_in_schema)

    def path_params(self) -> list[Param]:
        """Every path parameter, in path order, with its schema (given, or from its convertor)."""
        given = {p.name: p for p in self.operation.params if p.where == "path"}
        return [given.get(name) or Param(name, _convertor_schema(convertor), "path")
                for name, convertor in self.param_convertors.items()]


def _convertor_schema(convertor: Convertor[Any]) -> dict[str, Any]:
    if isinstance(convertor, IntegerConvertor):
        return {"type": "integer", "minimum": 0}
    if isinstance(convertor, FloatConvertor):
        return {"type": "number", "minimum": 0}
    if isinstance(convertor, UUIDConvertor):
        return {"type": "string", "format": "uuid"}
    return {"type": "string"}


def api_routes(routes: Iterable[BaseRoute]) -> list[ApiRoute]:
    """The table among `routes` (routes mounted without one are no API: tests' own, say)."""
    return [route for route in routes if isinstance(route, ApiRoute)]


def flagged_paths(routes: Iterable[BaseRoute], flag: Flag) -> frozenset[str]:
    """The paths of the routes with `flag` set, for middleware that matches a request's path exactly."""
    paths = set()
    for route in api_routes(routes):
        if getattr(route.operation, flag):
            if route.param_convertors:
                raise ValueError(f"{route.path}: a {flag} route cannot have path parameters")
            paths.add(route.path)
    return frozenset(paths)
