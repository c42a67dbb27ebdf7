"""Response objects and stream events of the Responses API, built from what the chat path answers.

`ResponseBuilder` takes a chat completion (or its stream's chunks, one at a time) and keeps the
response's output items: the assistant's text as a `message` item with one `output_text` part,
each tool call as a `function_call` item. Streamed and unstreamed answers go through the same
builder, so they cannot drift; streamed, each step also returns its typed events (each with its
`type` and `sequence_number`) in the order the `openai` SDK's stream accumulator expects:
`response.created`, `response.in_progress`, then per item `output_item.added` (+
`content_part.added`), its deltas, its `.done` events, and last `response.completed` (or
`response.incomplete` when `max_output_tokens` cut it, `response.failed` after an error).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from server.openai.responses_request import new_item_id

Event = dict[str, Any]


@dataclass
class ResponseDraft:
    """What a response echoes of its request."""

    id: str
    created_at: int
    model: str
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    text: dict[str, Any]
    temperature: float
    top_p: float
    max_output_tokens: int | None
    previous_response_id: str | None
    metadata: dict[str, str]
    store: bool
    user: str | None

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
             incomplete_reason: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens, "max_tool_calls": None,
            "model": self.model, "output": output, "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": self.store, "temperature": self.temperature, "text": self.text,
            "tool_choice": self.tool_choice if self.tool_choice is not None else "auto", "tools": self.tools,
            "top_logprobs": 0, "top_p": self.top_p, "truncation": "disabled", "usage": usage, "user": self.user,
            "metadata": self.metadata,
        }


def responses_usage(chat_usage: dict[str, int] | None) -> dict[str, Any] | None:
    if chat_usage is None:
        return None
    prompt, completion = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


@dataclass
class _Message:
    index: int
    text: list[str] = field(default_factory=list)


@dataclass
class _Call:
    index: int
    arguments: list[str] = field(default_factory=list)


class ResponseBuilder:
    """Chat output in; output items, the final response and (streamed) typed events out."""

    def __init__(self, draft: ResponseDraft) -> None:
        self.draft = draft
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self._sequence = 0
        self._message: _Message | None = None
        self._calls: dict[int, _Call] = {}  # by the chat tool call's index; open until the end
        self.response: dict[str, Any] | None = None  # once finished

    def _event(self, event_type: str, **fields: Any) -> Event:
        # A deep copy: the items keep changing after the event was made.
        event = {"type": event_type, **copy.deepcopy(fields), "sequence_number": self._sequence}
        self._sequence += 1
        return event

    def started(self) -> list[Event]:
        body = self.draft.body("in_progress", [])
        return [self._event("response.created", response=body), self._event("response.in_progress", response=body)]

    # ---- items ----------------------------------------------------------------------------

    def _open_message(self) -> list[Event]:
        item = {"type": "message", "id": new_item_id("msg"), "status": "in_progress", "role": "assistant",
                "content": []}
        self._message = _Message(len(self.output))
        self.output.append(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [self._event("response.output_item.added", output_index=self._message.index, item=item),
                  self._event("response.content_part.added", item_id=item["id"], output_index=self._message.index,
                              content_index=0, part=part)]
        item["content"].append(part)
        return events

    def _close_message(self, status: str) -> list[Event]:
        message, self._message = self._message, None
        if message is None:
            return []
        item = self.output[message.index]
        part = item["content"][0]
        part["text"] = "".join(message.text)
        item["status"] = status
        where = {"item_id": item["id"], "output_index": message.index}
        return [self._event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0, part=part),
                self._event("response.output_item.done", output_index=message.index, item=item)]

    def add_text(self, text: str) -> list[Event]:
        if not text:
            return []
        events = self._open_message() if self._message is None else []
        assert self._message is not None
        self._message.text.append(text)
        item_id = self.output[self._message.index]["id"]
        events.append(self._event("response.output_text.delta", item_id=item_id, output_index=self._message.index,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def add_call(self, delta: dict[str, Any]) -> list[Event]:
        """One entry of a chat `tool_calls` delta: a new call (id and name) or more of its arguments."""
        chat_index = delta.get("index", len(self._calls))
        function = delta.get("function") or {}
        events: list[Event] = []
        call = self._calls.get(chat_index)
        if call is None:
            events += self._close_message("completed")
            item = {"type": "function_call", "id": new_item_id("fc"),
                    "call_id": delta.get("id") or new_item_id("call"), "name": function.get("name") or "",
                    "arguments": "", "status": "in_progress"}
            call = self._calls[chat_index] = _Call(len(self.output))
            self.output.append(item)
            events.append(self._event("response.output_item.added", output_index=call.index, item=item))
        arguments = function.get("arguments") or ""
        if arguments:
            call.arguments.append(arguments)
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=self.output[call.index]["id"], output_index=call.index,
                                      delta=arguments))
        return events

    def _close_calls(self, status: str) -> list[Event]:
        events = []
        for call in self._calls.values():
            item = self.output[call.index]
            item["arguments"] = "".join(call.arguments)
            item["status"] = status
            events += [self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=call.index, name=item["name"], arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=call.index, item=item)]
        self._calls.clear()
        return events

    # ---- chat output in -------------------------------------------------------------------

    def take_chunk(self, chunk: dict[str, Any]) -> list[Event]:
        """One `chat.completion.chunk` (with `stream_options.include_usage`)."""
        if chunk.get("usage"):
            self.usage = responses_usage(chunk["usage"])
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            events += self.add_text(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                events += self.add_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def take_completion(self, completion: dict[str, Any]) -> None:
        """A whole `chat.completion`."""
        choice = completion["choices"][0]
        message = choice["message"]
        self.add_text(message.get("content") or "")
        for index, call in enumerate(message.get("tool_calls") or []):
            self.add_call({"index": index, **call})
        self.finish_reason = choice["finish_reason"]
        self.usage = responses_usage(completion.get("usage"))

    # ---- the end ----------------------------------------------------------------------------

    def finished(self) -> list[Event]:
        """Close what is open; the last event is `response.completed` (or `response.incomplete`)."""
        incomplete = self.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        events = self._open_message() if not self.output else []  # no text and no call: an empty message
        events += self._close_message(status) + self._close_calls(status)
        self.response = self.draft.body(status, self.output, self.usage,
                                        incomplete_reason="max_output_tokens" if incomplete else None)
        events.append(self._event(f"response.{status}", response=self.response))
        return events

    def failed(self, error: dict[str, Any]) -> list[Event]:
        """An error after the stream started (the chat path's error envelope): an `error` event, then
        `response.failed`."""
        message = str(error.get("message") or "The response failed.")
        server_side = error.get("type") in ("server_error", "service_unavailable_error")
        code = "server_error" if server_side else str(error.get("code") or "invalid_request_error")
        events = [self._event("error", code=code, message=message, param=error.get("param"))]
        if self._message is not None:  # what was streamed of the text stays in the failed response
            self.output[self._message.index]["content"][0]["text"] = "".join(self._message.text)
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        self.response = self.draft.body("failed", self.output, self.usage, error={"code": code, "message": message})
        events.append(self._event("response.failed", response=self.response))
        return events
