"""Request bodies of the OpenAI routes, as pydantic models.

Unknown fields are tolerated (clients send newer or vendor-specific ones). Types are strict, as
OpenAI's are: `"max_tokens": "9"`, `9.0` or `true` and `"stream": "yes"` are 400s, not coerced
(a float field still takes an integer). Every number that reaches a tensor or the sampler is
bounded here, so that a bad value comes back as a 400 naming the field and never reaches the
engine; checks that need the model (vocabulary, context length) live in `server.openai.params`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.http.errors import from_validation_error
from server.limits import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4
MAX_CHOICES = 128
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPT_LOGPROBS = 20  # vLLM's `prompt_logprobs`: alternatives per prompt token
MAX_MESSAGES = 2048  # as OpenAI; each is templated and tokenized before the engine sees the request
# Characters per stop string: the stop check holds back (and rescans) up to this much text per step.
MAX_STOP_LENGTH = 1024
MAX_STOP_TOKEN_IDS = 1024
# top_k beyond the vocabulary keeps everything; the bound keeps it an int32 (and so an int64 tensor).
MAX_TOP_K = 2**31 - 1


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients send `"temperature": null` to mean "the default"; honour that for every
        # field whose default is not null.
        if isinstance(data, dict):
            return {
                key: value for key, value in data.items()
                if not (value is None and key in cls.model_fields and cls.model_fields[key].default is not None)
            }
        return data


class TextPart(_Tolerant):
    type: Literal["text"]
    text: str


MAX_TOOLS = 128
# What OpenAI accepts as a function name; the name reaches templates, prompts and grammars.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class FunctionCall(_Tolerant):
    """A call an earlier assistant turn made: `arguments` is the JSON text of its arguments."""

    name: str
    arguments: str


class MessageToolCall(_Tolerant):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this is the result of

    def text(self) -> str:
        """The content as one string; a list of text parts is joined without separators."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Tolerant):
    include_usage: bool = False


class JSONSchemaFormat(_Tolerant):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Tolerant):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is `json_schema`")
        return self


class FunctionDefinition(_Tolerant):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(_Tolerant):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Tolerant):
    name: str


class NamedToolChoice(_Tolerant):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None


class _SamplingFields(_Tolerant):
    """Fields shared by chat and legacy completions."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    # int64 (the n choices use seed, seed + 1, ...), so torch's generator always accepts it.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=MAX_TOP_K)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]  # an empty stop string would end every request at once

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_PROMPT_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def wanted_top_logprobs(self) -> int | None:
        """None when no logprobs are wanted, else the number of alternatives."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def wanted_max_tokens(self) -> int | None:
        # max_completion_tokens supersedes the deprecated max_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_PROMPT_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=0)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("`prompt` must not be an empty list")
        return value

    def wanted_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token, or None: vLLM's `prompt_logprobs`, else `logprobs` under `echo`."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    names: set[str] = set()
    for model in models:
        for name, info in model.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
    return frozenset(names)


# What may appear in an error's `param`; pydantic also puts union member tags ("str",
# "list[str]", ...) in error locations, which mean nothing to a client.
FIELD_NAMES = _field_names(ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions,
                           ResponseFormat, JSONSchemaFormat, MessageToolCall, FunctionCall, ToolDefinition,
                           FunctionDefinition, NamedToolChoice, NamedFunction)


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: dict[str, Any]) -> M:
    """`model` from `body`, or a 400 naming the field (`param`) that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, FIELD_NAMES) from None
