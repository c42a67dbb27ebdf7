"""The bodies the OpenAI and vLLM routes answer with, as pydantic models, for the OpenAPI document.

`server.openai.protocol` and `server.openai.responses_output` build the bodies as plain dicts (the
hot path pays for no validation); these models describe them, and the spec tests validate real
answers against the schemas written from them, so the two cannot drift apart unseen. A field
every answer carries has no default (it is `required`); a nullable one is typed `| None`. Fields
some answers add (vLLM's `prompt_logprobs`, the SDK's logprob lists) are optional, and unknown
keys are allowed, as OpenAI adds fields over time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None


class PromptTokenLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token (the first null), its alternatives keyed by token id.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """A `chat.completion` object."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    """One streamed `tool_calls` entry: the first of a call has id, type and name; later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """A `chat.completion.chunk`; with `stream_options.include_usage` every chunk has `usage` (null until
    the last, which has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, `text_offset` counting characters from the text's start."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A `text_completion` object."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage | None


class CompletionChunk(BaseModel):
    """One streamed `text_completion`; with `stream_options.include_usage` the last has `usage` and no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    """A `model`: the base model (no parent) or an adapter of it."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    """The base model, then every registered adapter."""

    object: Literal["list"]
    data: list[Model]


class TokenizeResult(BaseModel):
    """The token ids (and, when asked, their strings)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResult(BaseModel):
    """The text of the token ids."""

    prompt: str


class VersionInfo(BaseModel):
    """Quiver's version."""

    version: str


# ---- the Responses API -----------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class ResponseObject(BaseModel, title="Response"):
    """A `response` object."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage | FunctionCallItem]
    usage: ResponseUsage | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    metadata: dict[str, str]
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    max_output_tokens: int | None
    parallel_tool_calls: bool
    tools: list[dict[str, Any]]
    text: dict[str, Any]


class ResponseStreamEvent(BaseModel):
    """One typed event of a streamed response (`response.created` ... `response.completed`, `error`);
    the SSE `event:` field repeats its `type`."""

    type: str
    sequence_number: int


class ResponseDeleted(BaseModel):
    """The stored response is gone."""

    id: str
    object: Literal["response"]
    deleted: Literal[True]


class InputItemList(BaseModel):
    """A page of a stored response's input items."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
