"""A Responses API request (`POST /v1/responses`) checked, and rendered as a chat completion request.

The Responses API is served over the chat path: `input` items become chat messages (a
`function_call` an assistant `tool_calls` entry, a `function_call_output` a `tool` message),
function tools and `text.format` their chat spellings. Input items are normalized to the shape
they are stored and listed in (each with an id), which is also the shape of output items, so a
stored conversation is rendered the same way as a new input.

What would change the answer and is not supported here (reasoning effort, background runs,
built-in tools, `include`, conversations, prompt templates, truncation) is a 400 naming it.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from server.http.errors import APIError, bad_request
from server.openai import responses_fields as fields
from server.openai.schemas import FUNCTION_NAME_PATTERN, MAX_MESSAGES

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
_ITEM_TYPES = ("message", "function_call", "function_call_output")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items()
                    if not (value is None and key in cls.model_fields and cls.model_fields[key].default is not None)}
        return data


class ResponsesRequest(_Strict, title="ResponseCreate"):
    """A Responses API request, answered over the chat completions path. Reasoning, background responses,
    built-in tools, `include`, conversations, prompt templates and truncation are refused with 400.

    pydantic checks the typed fields; `input`, `tools`, `tool_choice` and `text` are checked below.
    """

    model: str | None = None
    input: Annotated[Any, WithJsonSchema(fields.INPUT)] = None
    instructions: str | None = None
    tools: Annotated[Any, WithJsonSchema(fields.TOOLS)] = None
    tool_choice: Annotated[Any, WithJsonSchema(fields.TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    text: Annotated[Any, WithJsonSchema(fields.TEXT)] = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    user: str | None = None


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    names = set(ResponsesRequest.model_fields)
    loc = [str(part) for part in first.get("loc", ()) if part in names or isinstance(part, int)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    return bad_request(f"Invalid value for `{param}`: {message}" if param else message, param=param,
                       code="invalid_value")


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    """The request, or a 400 naming the field that is wrong or not supported."""
    _refuse_unsupported(body)
    try:
        req = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_metadata(req.metadata)
    if req.input is None and req.previous_response_id is None:
        raise bad_request("`input` is required (a string or a list of input items).", param="input")
    return req


def _unsupported(param: str, what: str) -> APIError:
    return bad_request(f"`{param}` {what} is not supported by this server.", param=param, code="unsupported_parameter")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    reasoning = body.get("reasoning")
    if reasoning is not None and not (isinstance(reasoning, dict) and reasoning.get("effort") in (None, "none")
                                      and reasoning.get("summary") is None):
        raise _unsupported("reasoning", "(reasoning effort or summaries; the served models do not reason)")
    if body.get("background") not in (None, False):
        raise _unsupported("background", "(background responses)")
    include = body.get("include")
    if include is not None and include != []:
        shown = include[0] if isinstance(include, list) and include else include
        raise _unsupported("include", f"({shown!r}; nothing can be included)")
    for name in ("conversation", "prompt", "context_management", "moderation"):
        if body.get(name) is not None:
            raise _unsupported(name, "")
    if body.get("truncation") not in (None, "disabled"):
        raise _unsupported("truncation", f"{body['truncation']!r} (only 'disabled')")
    if body.get("top_logprobs") not in (None, 0):
        raise _unsupported("top_logprobs", "(logprobs)")


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"`metadata` holds {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed.",
                          param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise bad_request(f"`metadata` key {key[:80]!r}: keys hold at most {MAX_METADATA_KEY} characters and "
                              f"values at most {MAX_METADATA_VALUE}.", param="metadata")


# ---- input items ------------------------------------------------------------------------


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"`{where}.{key}` must be a string.", param=f"{where}.{key}")
    return value


def _content_parts(content: Any, role: str, where: str) -> list[dict[str, Any]]:
    """Message content as normalized text parts (input_text, or output_text for the assistant)."""
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, dict) else None
            if part_type in _TEXT_PARTS:
                texts.append(_string(part, "text", f"{where}.content[{i}]"))
            elif part_type == "refusal":
                texts.append(_string(part, "refusal", f"{where}.content[{i}]"))
            else:
                raise bad_request(f"`{where}.content[{i}]`: content parts of type {part_type!r} are not supported; "
                                  "this server takes text only (input_text, output_text).",
                                  param=f"{where}.content[{i}].type", code="unsupported_content")
    else:
        raise bad_request(f"`{where}.content` must be a string or a list of content parts.", param=f"{where}.content")
    if kind == "output_text":
        return [{"type": kind, "text": text, "annotations": []} for text in texts]
    return [{"type": kind, "text": text} for text in texts]


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(part["text"] for part in _content_parts(output, "user", where))
    raise bad_request(f"`{where}.output` must be a string or a list of text parts.", param=f"{where}.output")


def _item_id(item: dict[str, Any], prefix: str) -> str:
    given = item.get("id")
    return given if isinstance(given, str) and given else new_item_id(prefix)


def _normalize_item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise bad_request(f"`{where}` must be an object (an input item).", param=where)
    item_type = item.get("type", "message" if "role" in item else None)
    if item_type == "message":
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise bad_request(f"`{where}.role` must be one of {', '.join(_MESSAGE_ROLES)}; got {role!r}.",
                              param=f"{where}.role")
        return {"type": "message", "id": _item_id(item, "msg"), "role": role, "status": "completed",
                "content": _content_parts(item.get("content"), role, where)}
    if item_type == "function_call":
        return {"type": "function_call", "id": _item_id(item, "fc"),
                "call_id": _string(item, "call_id", where), "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where), "status": "completed"}
    if item_type == "function_call_output":
        return {"type": "function_call_output", "id": _item_id(item, "fco"),
                "call_id": _string(item, "call_id", where), "output": _output_text(item.get("output"), where),
                "status": "completed"}
    raise bad_request(f"`{where}`: input items of type {item_type!r} are not supported; this server takes "
                      f"{', '.join(_ITEM_TYPES)}.", param=f"{where}.type", code="unsupported_input_item")


def normalize_input(raw: Any) -> list[dict[str, Any]]:
    """`input` as normalized items: a string is one user message."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [_normalize_item({"role": "user", "content": raw}, "input")]
    if not isinstance(raw, list):
        raise bad_request("`input` must be a string or a list of input items.", param="input")
    if len(raw) > MAX_MESSAGES:
        raise bad_request(f"`input` holds {len(raw)} items; at most {MAX_MESSAGES} are allowed.", param="input")
    return [_normalize_item(item, f"input[{i}]") for i, item in enumerate(raw)]


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized items as chat messages, `instructions` first as the system message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    names: dict[str, str] = {}  # call id -> function name, for the tool message answering it
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": "".join(part["text"] for part in item["content"])})
        elif item["type"] == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls made in one turn share its message
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            message = {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            messages.append(message)
    return messages


# ---- tools and formats ------------------------------------------------------------------


def normalize_tools(raw: Any) -> list[dict[str, Any]]:
    """Function tools as echoed in the response; any other tool type is a 400 naming it."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("`tools` must be a list of tools.", param="tools")
    tools = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        tool_type = tool.get("type") if isinstance(tool, dict) else None
        if tool_type != "function":
            raise bad_request(f"`{where}`: tools of type {tool_type!r} are not supported; this server runs only "
                              "`function` tools (no built-in tools).", param=f"{where}.type", code="unsupported_tool")
        name = _string(tool, "name", where)
        if not re.fullmatch(FUNCTION_NAME_PATTERN, name):
            raise bad_request(f"`{where}.name` {name[:80]!r} is not a function name (1 to 64 letters, digits, "
                              "and _ . : -).", param=f"{where}.name")
        parameters = tool.get("parameters")
        description = tool.get("description")
        strict = tool.get("strict", True)
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"`{where}.parameters` must be a JSON schema object.", param=f"{where}.parameters")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"`{where}.description` must be a string.", param=f"{where}.description")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(f"`{where}.strict` must be a boolean.", param=f"{where}.strict")
        tools.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                      "strict": strict})
    return tools


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        key: tool[key] for key in ("name", "description", "parameters", "strict") if tool[key] is not None}}
        for tool in tools]


def chat_tool_choice(raw: Any) -> str | dict[str, Any] | None:
    """`tool_choice` in chat's spelling (None: not given)."""
    if raw is None:
        return None
    if raw in ("none", "auto", "required"):
        return str(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": _string(raw, "name", "tool_choice")}}
    shown = raw.get("type") if isinstance(raw, dict) else raw
    raise bad_request(f"`tool_choice` {shown!r} is not supported; use none, auto, required or "
                      '{"type": "function", "name": ...}.', param="tool_choice")


FormatType = Literal["text", "json_object", "json_schema"]


def normalize_text(raw: Any) -> dict[str, Any]:
    """`text` as echoed in the response: `format` (text, json_object or json_schema) and verbosity."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise bad_request("`text` must be an object.", param="text")
    if raw.get("verbosity") not in (None, "medium"):
        raise _unsupported("text.verbosity", f"{raw['verbosity']!r} (only 'medium')")
    fmt = raw.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise bad_request("`text.format` must be an object.", param="text.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"format": {"type": kind}, "verbosity": "medium"}
    if kind != "json_schema":
        raise bad_request(f"`text.format.type` must be text, json_object or json_schema; got {kind!r}.",
                          param="text.format.type")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise bad_request("`text.format.schema` must be a JSON schema object.", param="text.format.schema")
    name = _string(fmt, "name", "text.format")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("`text.format.strict` must be a boolean.", param="text.format.strict")
    description = fmt.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request("`text.format.description` must be a string.", param="text.format.description")
    return {"format": {"type": "json_schema", "name": name, "schema": schema, "strict": strict,
                       "description": description}, "verbosity": "medium"}


def chat_response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    fmt = text["format"]
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = {key: fmt[key] for key in ("name", "schema", "strict", "description") if fmt[key] is not None}
    return {"type": "json_schema", "json_schema": spec}


def chat_body(req: ResponsesRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
              text: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request that answers `req`."""
    body: dict[str, Any] = {"messages": messages, "temperature": req.temperature, "top_p": req.top_p,
                            "stream": req.stream}
    if req.model is not None:
        body["model"] = req.model
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if tools:
        body["tools"] = chat_tools(tools)
        body["parallel_tool_calls"] = req.parallel_tool_calls
    tool_choice = chat_tool_choice(req.tool_choice)
    if tool_choice not in (None, "none", "auto") and not tools:
        raise bad_request("`tool_choice` names a tool call but `tools` holds no function tools.", param="tool_choice")
    if tool_choice is not None and tools:
        body["tool_choice"] = tool_choice
    response_format = chat_response_format(text)
    if response_format is not None:
        body["response_format"] = response_format
    if req.user is not None:
        body["user"] = req.user
    return body
