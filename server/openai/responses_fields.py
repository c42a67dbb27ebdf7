"""The JSON schemas of the Responses API request fields that `ResponsesRequest` takes as `Any`.

Those fields (`input`, `tools`, `tool_choice`, `text`) are checked by hand in
`server.openai.responses_request`, where each refusal names the exact item at fault; pydantic only
carries these schemas into the OpenAPI document (`WithJsonSchema`), next to the fields they describe.
"""

from __future__ import annotations

from typing import Any

from server.openai.schemas import FUNCTION_NAME_PATTERN, MAX_MESSAGES

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}}}
_INPUT_ITEM: dict[str, Any] = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"enum": ["message"]}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"enum": ["function_call"]}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "The arguments as JSON text."}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"enum": ["function_call_output"]}, "call_id": {"type": "string"}, "output": {"type": "string"}}},
]}

INPUT: dict[str, Any] = {"oneOf": [{"type": "string"},
                                   {"type": "array", "maxItems": MAX_MESSAGES, "items": _INPUT_ITEM}]}
TOOLS: dict[str, Any] = {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"enum": ["function"]}, "name": {"type": "string", "pattern": FUNCTION_NAME_PATTERN},
    "description": {"type": "string"}, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}}
TOOL_CHOICE: dict[str, Any] = {"oneOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "name"],
    "properties": {"type": {"enum": ["function"]}, "name": {"type": "string"}}}]}
TEXT: dict[str, Any] = {"type": "object", "properties": {"format": {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "name", "schema"], "properties": {
        "type": {"enum": ["json_schema"]}, "name": {"type": "string"}, "schema": {"type": "object"},
        "strict": {"type": "boolean"}}}]}}}
