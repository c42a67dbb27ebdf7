"""Tool calling on chat completions: the request's tools checked, put in the prompt, forced by a
grammar when asked, and the calls the model wrote turned into `tool_calls`.

- Tools reach the model through its own chat template (`tools=` of `apply_chat_template`), and
  earlier assistant calls and tool results as the templates of Hugging Face models expect them
  (`tool_calls` with `arguments` as a dict; `role: "tool"` with `tool_call_id` and `name`).
- A template that takes no `tools` gets them in a system prompt in the format of the tool-call
  parser (Hermes `<tool_call>` by default; see `server/tool_parsers/`); earlier calls are then
  written into the assistant turn in that format and tool results become a user turn
  `<tool_response>\\n...\\n</tool_response>`, so any chat model can be offered tools.
- `tool_choice` "auto" lets the model write what it wants and parses the calls from it; "required"
  and a named function constrain decoding with an llguidance grammar to one call (several with
  `parallel_tool_calls`) whose arguments match the function's JSON schema; "none" offers no tools.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from server.http.errors import bad_request
from server.openai.schemas import ChatCompletionRequest, FunctionDefinition
from server.openai.structured import WHITESPACE_PATTERN, StructuredOutputs
from server.openai.tool_parsers import StreamingToolParser, ToolParser, detect_parser, parser_named

TOOL_RESPONSE_START = "<tool_response>\n"
TOOL_RESPONSE_END = "\n</tool_response>"
# The blanks JSON serializers write (see server/structured.py), bounded: a forced call always ends.
_JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE_PATTERN}


@dataclass
class ToolPlan:
    """What a request asks of tools: the parser of its model's format, the tools offered and forced."""

    parser: ToolParser
    tools: list[dict[str, Any]] = field(default_factory=list)  # offered (OpenAI dicts); empty: none
    forced: list[FunctionDefinition] = field(default_factory=list)  # a grammar forces a call of one
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools)

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def grammar(self) -> str | None:
        """The Lark grammar of the forced calls; None when the model writes freely."""
        if not self.forced:
            return None
        schemas = [{**self.parser.call_schema(f.name, _arguments_schema(f.parameters)), "x-guidance": _JSON_OPTIONS}
                   for f in self.forced]
        return self.parser.grammar(schemas, self.parallel)

    def stream_parsers(self, count: int) -> list[StreamingToolParser] | None:
        if not self.parses_calls:
            return None
        return [self.parser.stream(self.max_calls) for _ in range(count)]


def parser_for(configured: str | None, chat_template: str) -> ToolParser:
    """`--tool-call-parser` when given, else the format the chat template implies."""
    return parser_named(configured) if configured else detect_parser(chat_template)


def plan_tools(req: ChatCompletionRequest, parser: ToolParser) -> ToolPlan:
    """Check `tools`, `tool_choice` and `parallel_tool_calls`; 400 naming what is wrong."""
    definitions = [tool.function for tool in req.tools or []]
    choice = req.tool_choice
    if choice is not None and not definitions:
        raise bad_request("`tool_choice` is only allowed when `tools` are given.", param="tool_choice")
    if not definitions:
        return ToolPlan(parser)
    names = [f.name for f in definitions]
    for position, function in enumerate(definitions):
        if names.index(function.name) != position:
            raise bad_request(f"Two tools are named {function.name!r}; tool names must be unique.", param="tools")
        _check_parameters(function, position)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan(parser, parallel=req.parallel_tool_calls)
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    forced: list[FunctionDefinition] = []
    parallel = req.parallel_tool_calls
    if choice == "required":
        forced = definitions
    elif not isinstance(choice, str):
        wanted = choice.function.name
        if wanted not in names:
            raise bad_request(f"tool_choice names the function {wanted!r}, which is not in `tools` "
                              f"({', '.join(names)}).", param="tool_choice")
        forced, parallel = [definitions[names.index(wanted)]], False
    if forced and req.response_format is not None and req.response_format.type != "text":
        raise bad_request("A forced tool call (`tool_choice` required or a function) cannot be combined with "
                          f"`response_format` {req.response_format.type}.", param="response_format")
    return ToolPlan(parser, tools, forced, parallel)


def _arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    schema = dict(parameters or {})
    schema.setdefault("type", "object")
    return schema


def _check_parameters(function: FunctionDefinition, position: int) -> None:
    import llguidance

    where = f"tools[{position}].function.parameters"
    parameters = function.parameters or {}
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{where} (function {function.name!r}) must describe a JSON object, not "
                          f"{parameters.get('type')!r}.", param="tools")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_arguments_schema(parameters))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as exc:
        is_error, messages = True, [str(exc)]
    if is_error:
        raise bad_request(f"{where} (function {function.name!r}) is not a valid JSON schema: "
                          f"{'; '.join(messages)}", param="tools")


# ---- the prompt ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def template_takes_tools(chat_template: str) -> bool:
    """Whether the template reads a `tools` variable (else tools go in a fallback system prompt)."""
    import jinja2
    import jinja2.meta

    try:
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        return "tools" in jinja2.meta.find_undeclared_variables(environment.parse(chat_template))
    except jinja2.TemplateSyntaxError:
        return "tools" in chat_template


def template_messages(
    messages: list[dict[str, Any]], chat_template: str, plan: ToolPlan,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (plain dicts, tool calls' arguments as JSON text) shaped for `chat_template`, and
    the `tools` to pass it (None: the template is not given tools)."""
    native = template_takes_tools(chat_template)
    names_by_id: dict[str, str] = {}
    shaped: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        if message.get("tool_calls"):
            calls = [(call["function"]["name"], _parsed_arguments(call["function"]["arguments"], position, i))
                     for i, call in enumerate(message["tool_calls"])]
            names_by_id.update({call["id"]: call["function"]["name"] for call in message["tool_calls"]
                                if call.get("id")})
            if native:
                message = {**message, "tool_calls": [
                    {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": arguments}}
                    for call, (name, arguments) in zip(message["tool_calls"], calls, strict=True)]}
            else:
                text = plan.parser.render_calls(calls)
                message = {"role": "assistant", "content": f"{message['content']}\n{text}" if message["content"]
                           else text}
        elif message["role"] == "tool":
            name = message.get("name") or names_by_id.get(message.get("tool_call_id") or "")
            if not native:
                result = TOOL_RESPONSE_START + message["content"] + TOOL_RESPONSE_END
                if shaped and shaped[-1].get("_tool_results"):  # consecutive results: one turn
                    shaped[-1]["content"] += "\n" + result
                    continue
                message = {"role": "user", "content": result, "_tool_results": True}
            elif name is not None:
                message = {**message, "name": name}
        shaped.append(message)
    for message in shaped:
        message.pop("_tool_results", None)
    if not plan.tools:
        return shaped, None
    if native:
        return shaped, plan.tools
    return _with_system_prompt(shaped, plan.parser.instructions(plan.tools)), None


def _parsed_arguments(arguments: str, position: int, index: int) -> Any:
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise bad_request(f"messages[{position}].tool_calls[{index}].function.arguments is not valid JSON: "
                          f"{arguments[:80]!r}.", param="messages") from None


def _with_system_prompt(messages: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


# ---- decoding and the answer -----------------------------------------------------------


def forced_call_grammar(structured: StructuredOutputs, grammar: str) -> str:
    """The checked grammar text of a forced call (what the engine is given); 400 naming `tools`
    when a schema cannot be compiled. Slow for big schemas: call it from a worker thread."""
    import llguidance

    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    structured.matcher(compiled, "Unsupported JSON schema in tools", "tools")
    return compiled


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """`tool_calls` for a choice that ended on its own after calling tools."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def apply_to_completion(body: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """An unstreamed chat completion with the calls in each choice's text made `tool_calls`."""
    if not plan.parses_calls:
        return body
    for choice in body["choices"]:
        message = choice["message"]
        parsed = plan.parser.parse(message["content"] or "", plan.max_calls)
        if parsed.calls:
            message["content"] = parsed.content
            message["tool_calls"] = [call.to_dict() for call in parsed.calls]
            choice["finish_reason"] = finish_reason(choice["finish_reason"], True)
    return body
