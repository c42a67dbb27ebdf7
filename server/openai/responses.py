"""`/v1/responses`: create (streamed or not), retrieve, delete, and list a response's input items.

A response is answered by the chat completions route: the request is rendered as a chat
completion request (server/responses_request.py) and handed to that route in-process, over the
client's own connection, so limits, adapters, structured outputs, tool calling and disconnects
behave as they do for chat. Its answer becomes the response object or the typed stream events
(server/responses_output.py). With `store` (the default) a response is kept in the server's SQLite
store together with the conversation it answered, so `previous_response_id` continues that
conversation, also after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from server.http import off_loop
from server.http.errors import APIError, bad_request, parse_json_body
from server.http.routing import ApiRoute, Operation, Param
from server.openai.answers import InputItemList, ResponseDeleted, ResponseObject, ResponseStreamEvent
from server.openai.chat import chat_completions
from server.openai.responses_output import Event, ResponseBuilder, ResponseDraft
from server.openai.responses_request import (
    ResponsesRequest,
    chat_body,
    chat_messages,
    new_item_id,
    normalize_input,
    normalize_text,
    normalize_tools,
    parse_request,
)
from server.state import ServerState
from server.store import Store

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MAX_LISTED_ITEMS = 100
TAG = "OpenAI"
# Where the chat path's errors name its own fields, the client named these.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "response_format": "text.format"}


@dataclass
class _Plan:
    req: ResponsesRequest
    items: list[dict[str, Any]]  # this request's input, normalized
    conversation: list[dict[str, Any]]  # every item answered: earlier turns, then `items`
    chat: bytes  # the chat completion request answering it
    draft: ResponseDraft


def not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"No response with id {response_id!r} is stored on this server.", param=param,
                    code="response_not_found")


def _sse(event: Event) -> dict[str, str]:
    return {"event": event["type"],
            "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)}


def _chat_error(exc: APIError) -> APIError:
    """The chat path's error, naming the Responses field the client sent."""
    if exc.param:
        head, _, rest = exc.param.partition(".")
        if head in _PARAMS:
            exc.param = _PARAMS[head]
        elif head == "tools" and rest:  # tools.0.function.name: the tool's own field here
            index, _, field = rest.partition(".")
            field = field.removeprefix("function.").removeprefix("function")
            exc.param = f"tools[{index}]" + (f".{field}" if field else "")
    return exc


def _chat_request(request: Request, body: bytes) -> Request:
    """The chat completion request as the chat route reads it: `body`, then the client's connection
    (its disconnect), under the client's scope."""
    delivered = False
    client_receive = request.receive

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await client_receive()

    return Request({**request.scope, "path": CHAT_PATH, "raw_path": CHAT_PATH.encode()}, receive)


class _Responses:
    def __init__(self, store: Store) -> None:
        self._store = store

    def _plan(self, body: dict[str, Any], base_model: str) -> _Plan:
        req = parse_request(body)
        items = normalize_input(req.input)
        tools = normalize_tools(req.tools)
        text = normalize_text(req.text)
        conversation = items
        if req.previous_response_id is not None:
            previous = self._store.response(req.previous_response_id)
            if previous is None:
                raise not_found(req.previous_response_id, param="previous_response_id")
            conversation = [*previous.conversation, *previous.body["output"], *items]
        if not conversation:
            raise bad_request("`input` is empty: there is nothing to respond to.", param="input")
        chat = chat_body(req, chat_messages(req.instructions, conversation), tools, text)
        draft = ResponseDraft(
            id=new_item_id("resp"), created_at=int(time.time()), model=req.model or base_model,
            instructions=req.instructions, tools=tools, tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls, text=text, temperature=req.temperature, top_p=req.top_p,
            max_output_tokens=req.max_output_tokens, previous_response_id=req.previous_response_id,
            metadata=req.metadata or {}, store=req.store, user=req.user)
        return _Plan(req, items, conversation, json.dumps(chat, ensure_ascii=False).encode(), draft)

    def _save(self, plan: _Plan, response: dict[str, Any]) -> None:
        self._store.save_response(response["id"], response, plan.items, plan.conversation)

    async def create(self, request: Request) -> Response:
        state: ServerState = request.app.state.quiver
        base_model = state.require_engine().model_name
        body = await parse_json_body(request)
        if off_loop.is_large(await request.body()):  # rendering megabytes of input would stall the loop
            plan = await off_loop.run_off_loop(self._plan, body, base_model)
        elif body.get("previous_response_id") is not None:  # a stored conversation is read and decoded
            plan = await asyncio.to_thread(self._plan, body, base_model)
        else:
            plan = self._plan(body, base_model)
        try:
            answer = await chat_completions(_chat_request(request, plan.chat))
        except APIError as exc:
            raise _chat_error(exc) from None
        builder = ResponseBuilder(plan.draft)
        if isinstance(answer, EventSourceResponse):
            return EventSourceResponse(self._events(plan, builder, answer.body_iterator))
        if answer.status_code != 200:  # the client left before the answer started
            return answer
        builder.take_completion(json.loads(bytes(answer.body)))
        builder.finished()
        assert builder.response is not None
        if plan.req.store:
            await asyncio.to_thread(self._save, plan, builder.response)
        return JSONResponse(builder.response)

    async def _events(self, plan: _Plan, builder: ResponseBuilder,
                      chunks: AsyncIterator[Any]) -> AsyncIterator[dict[str, str]]:
        try:
            for event in builder.started():
                yield _sse(event)
            async for message in chunks:
                data = message["data"]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    for event in builder.failed(chunk["error"]):
                        yield _sse(event)
                    return
                for event in builder.take_chunk(chunk):
                    yield _sse(event)
            events = builder.finished()
            if plan.req.store:
                try:
                    await asyncio.to_thread(self._save, plan, builder.response)  # before the client hears of it
                except Exception:
                    logger.exception("storing response %s failed", plan.draft.id)
                    events = builder.failed({"type": "server_error", "message": "The response could not be stored."})
            for event in events:
                yield _sse(event)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # aborts the generation if the client left

    async def _stored(self, request: Request) -> tuple[str, Any]:
        response_id = request.path_params["response_id"]
        stored = await asyncio.to_thread(self._store.response, response_id)
        if stored is None:
            raise not_found(response_id)
        return response_id, stored

    async def retrieve(self, request: Request) -> Response:
        _, stored = await self._stored(request)
        return JSONResponse(stored.body)

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not await asyncio.to_thread(self._store.delete_response, response_id):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        """The input items the response was given, newest first unless `order=asc`; `limit`, `after`."""
        _, stored = await self._stored(request)
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"`order` must be asc or desc; got {order!r}.", param="order")
        raw_limit = query.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,3}", raw_limit) or not 1 <= int(raw_limit) <= MAX_LISTED_ITEMS:
            raise bad_request(f"`limit` must be an integer from 1 to {MAX_LISTED_ITEMS}; got {raw_limit!r}.",
                              param="limit")
        items = list(stored.input_items if order == "asc" else reversed(stored.input_items))
        after = query.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise bad_request(f"`after` names no input item of this response: {after!r}.", param="after")
            items = items[ids.index(after) + 1:]
        page = items[: int(raw_limit)]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)})


def responses_routes(store: Store) -> list[ApiRoute]:
    """The Responses API over `store` (stored responses)."""
    handlers = _Responses(store)
    one = "/v1/responses/{response_id}"
    return [
        ApiRoute("/v1/responses", handlers.create, Operation(
            "Create a response (the Responses API)", TAG, body=ResponsesRequest, response=ResponseObject,
            stream=ResponseStreamEvent, errors=(400, 404, 429, 503), missing="model or response", generation=True),
            methods=["POST"]),
        ApiRoute(one, handlers.retrieve, Operation(
            "Retrieve a stored response", TAG, response=ResponseObject, errors=(404,), missing="response"),
            methods=["GET"]),
        ApiRoute(one, handlers.delete, Operation(
            "Delete a stored response", TAG, response=ResponseDeleted, errors=(404,), missing="response"),
            methods=["DELETE"]),
        ApiRoute(one + "/input_items", handlers.input_items, Operation(
            "List a stored response's input items", TAG, response=InputItemList, errors=(400, 404),
            missing="response", params=(
                Param("order", {"enum": ["asc", "desc"]}),
                Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LISTED_ITEMS}),
                Param("after"))), methods=["GET"]),
    ]
