"""The OpenAI error envelope, and the mapping from every failure to its HTTP status.

Every 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}` with all four keys,
because the openai client reads them by name. Validation failures are 400, never 422.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from engine.errors import (
    AdapterFailedError,
    AdapterUnavailableError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    RequestTooLongError,
    UnknownAdapterError,
)
from server.http import off_loop

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# A `\uD800`-`\uDFFF` escape: the only way a lone surrogate gets into a parsed body.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def not_ready() -> APIError:
    return APIError(503, "The model is still loading; retry shortly.", code="model_not_ready",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def from_validation_error(exc: ValidationError, field_names: Collection[str] | None = None) -> APIError:
    """The first pydantic error as a 400 naming the offending field.

    field_names: the names a field path may hold (pydantic also puts union members' tags in it);
    None keeps every part.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())
           if isinstance(part, int) or field_names is None or part in field_names]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"Invalid value for `{param}`: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=param, code="invalid_value")


def from_engine_error(exc: Exception, model: str) -> APIError:
    """Map what `engine.generate` raises before its first delta to a status."""
    if isinstance(exc, UnknownAdapterError):
        return model_not_found(model)
    if isinstance(exc, AdapterFailedError):
        # The adapter failed validation: retrying cannot help until an operator replaces it.
        return bad_request(str(exc), param="model", code="adapter_failed")
    if isinstance(exc, AdapterUnavailableError):
        # The adapter exists but cannot serve: the client may retry later or pick another.
        return APIError(503, str(exc), param="model", code="model_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc) or "The server is overloaded; retry shortly.", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RequestTooLongError):
        return bad_request(str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "The engine stopped.", code="engine_dead")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    if isinstance(exc, ValueError):  # the engine's own checks of what the request carries
        return bad_request(str(exc))
    logger.exception("unexpected error from the engine", exc_info=exc)
    return APIError(500, "Internal server error.", type="server_error", code="internal_error")


async def parse_json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it (`decode_json_body`).

    A large body is decoded on a worker thread, so that decoding it never stalls the event loop.
    """
    raw = await request.body()
    if off_loop.is_large(raw):
        return await off_loop.run_off_loop(decode_json_body, raw)
    return decode_json_body(raw)


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it.

    What comes back is text all the way down: no UTF-16 surrogate (raw or escaped), which the
    tokenizer, SQLite and the UTF-8 of any response would fail on, and no NaN or infinity,
    which no field takes and no response may carry.
    """
    if not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        # Strict decoding: `json.loads(bytes)` lets UTF-8-encoded surrogates (b"\xed\xa0\x80") through.
        text = raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError) as exc:
        raise bad_request(f"The request body is not valid UTF-8 text: {exc}", code="invalid_json") from None
    try:
        body = off_loop.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except off_loop.JSONTooLarge as exc:
        raise bad_request(f"The request body is too large to decode: {exc}.", code="request_too_large") from None
    except _NonFiniteNumber as exc:
        raise bad_request(f"The request body holds {exc}, which is not a finite number.",
                          code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise bad_request("The request body contains an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF).",
                          code="invalid_json")
    return body


def _has_lone_surrogate(body: Any) -> bool:
    pending = [body]
    while pending:  # a loop, not recursion: the body may be nested as deep as json allows
        node = pending.pop()
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


class _NonFiniteNumber(ValueError):
    pass


def _non_finite(literal: str) -> float:
    raise _NonFiniteNumber(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999
        raise _NonFiniteNumber(literal[:32])
    return value


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404:
        message = f"No route for {request.method} {request.url.path}."
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return APIError(status, message, code=code, headers=dict(exc.headers or {})).response()


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return from_validation_error(exc).response()


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "Internal server error.", type="server_error", code="internal_error").response()


EXCEPTION_HANDLERS = {
    APIError: _api_error_handler,
    HTTPException: _http_exception_handler,
    ValidationError: _validation_error_handler,
    Exception: _unexpected_error_handler,
}
