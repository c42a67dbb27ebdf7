"""Check an answer against what the OpenAPI document says of it: the schema of its status and content
type, each `data:` event of a stream against the event schema (an `error` event against `Error`)."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

_ERROR_REF = "#/components/schemas/Error"


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """`schema` (a `$ref` into the document, usually) with the document's components to resolve it."""
    return Draft202012Validator({**schema, "components": document["components"]})


def documented_schema(document: dict[str, Any], method: str, path: str, status: int,
                      media_type: str) -> dict[str, Any]:
    """The schema the document gives for this answer; a KeyError says the answer is undocumented."""
    responses = document["paths"][path][method.lower()]["responses"]
    return responses[str(status)]["content"][media_type]["schema"]


def sse_data(text: str) -> list[Any]:
    """The JSON of each `data:` line of a server-sent event stream, `[DONE]` left out."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            if data != "[DONE]":
                events.append(json.loads(data))
    return events


def check_answer(document: dict[str, Any], method: str, path: str, status: int, content_type: str,
                 text: str) -> None:
    """Raise (jsonschema's ValidationError, or KeyError) unless the answer is what the document says."""
    media_type = content_type.split(";")[0].strip()
    schema = documented_schema(document, method, path, status, media_type)
    if media_type == "text/event-stream":
        events, errors = validator(document, schema), validator(document, {"$ref": _ERROR_REF})
        for data in sse_data(text):
            (errors if isinstance(data, dict) and "error" in data else events).validate(data)
    else:
        validator(document, schema).validate(json.loads(text))
