"""`POST /v1/inference/chat/completions`: chat completions for the `seekrai` SDK.

The chat pipeline of `/v1/chat/completions` (`server.openai.chat`: plan, start, collect); what
differs is how `model` resolves and the shape of the answer. `model` may name a
deployment (it must be promoted), a fine-tune, an adapter or the base model. The SDK always
sends `max_tokens` (512 unless told otherwise); like every surface, a budget the context or the
server's ceiling cannot hold is refused (`server.limits`), never cut. Logprobs carry the SDK's fields next to OpenAI's: a streamed chunk
describes exactly one token (`token`, `token_logprob`, `top_logprobs` as {token: logprob},
`text_offset`) and also holds OpenAI's `content` list for it; a whole answer holds the
parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and `content`.
A `top_logprobs` above 20 is a 400, which the SDK raises as its `InvalidRequestError`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.outputs import RequestDelta, TokenLogprob
from server.http.errors import bad_request, parse_json_body
from server.http.routing import ApiRoute, Operation
from server.openai import pipeline, protocol
from server.openai.answers import ChatCompletion, ChatCompletionChunk
from server.openai.chat import check_chat, plan_chat, start_chat
from server.openai.generation import ClientDisconnected
from server.openai.protocol import ChoiceState, ResponseMeta
from server.openai.schemas import ChatCompletionRequest, validated
from server.openai.streaming import stream_events
from server.seekrflow.deployments import Deployments
from server.state import ServerState
from server.store import Deployment, Store
from training.errors import NotFoundError
from training.jobs import JobManager

# The SDK reads `data:` lines only; a keep-alive comment would reach its JSON parser.
_NO_PING_S = 24 * 3600


def _to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The SDK's request as the OpenAI body Quiver validates; 400 for what Quiver cannot do."""
    body = dict(body)
    for key, what in (("echo", "echo"), ("safety_model", "safety models"), ("tools", "tools"),
                      ("tool_choice", "tools")):
        if body.pop(key, None):
            raise bad_request(f"`{key}` is not supported: Quiver does not offer {what} here.", param=key)
    top = body.get("top_logprobs")
    if isinstance(top, int) and not isinstance(top, bool):
        if top > 0:
            body["logprobs"] = True  # the SDK's rule: top_logprobs > 0 implies logprobs
        elif not body.get("logprobs"):
            body.pop("top_logprobs")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object" and isinstance(fmt.get("schema"), dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt["schema"]}}
    return body


def _token_logprobs(entry: TokenLogprob, decoder: Any, offset: int, hidden: bool) -> dict[str, Any]:
    """One token, the SDK's way and OpenAI's way."""
    body = protocol.chat_logprobs([entry], decoder, hidden)
    body.update(token="" if hidden else decoder.token_str(entry.token_id),
                token_logprob=protocol.clamp_logprob(entry.logprob), text_offset=offset,
                top_logprobs={decoder.token_str(t): protocol.clamp_logprob(lp) for t, lp in entry.top})
    return body


def chat_route(state: ServerState, store: Store, jobs: JobManager, deployments: Deployments) -> ApiRoute:
    async def resolve(model: str | None) -> tuple[str | None, Deployment | None]:
        """(adapter or None for the base, the deployment whose tokens this request counts)."""
        if model:
            deployment = await asyncio.to_thread(store.deployment, model)
            if deployment is not None:
                if not deployment.active or deployment.error is not None:
                    raise bad_request(f"Deployment {model} is not active; promote it first.", param="model",
                                      code="deployment_inactive")
                return deployment.adapter, deployment
            try:
                job = await asyncio.to_thread(jobs.get_job, model)
            except NotFoundError:
                job = None
            if job is not None:
                if not job["fine_tuned_model"]:
                    raise bad_request(f"Fine-tune {model} is {job['status']}; it has no model to serve yet.",
                                      param="model", code="fine_tune_not_completed")
                model = job["fine_tuned_model"]
        await state.discover(model)
        adapter = state.resolve_model(model)
        return adapter, await deployments.find_serving(adapter)

    async def endpoint(request: Request) -> Response:
        req = validated(ChatCompletionRequest, _to_openai(await parse_json_body(request)))
        check_chat(state, req)
        state.require_engine()
        adapter, deployment = await resolve(req.model)
        plan = plan_chat(state, req, adapter)
        try:
            started = await start_chat(request, state, plan)
        except ClientDisconnected:
            return Response(status_code=pipeline.CLIENT_CLOSED)
        meta = started.meta

        async def count(completion_tokens: int) -> None:
            if deployment is not None:
                await asyncio.to_thread(store.count_tokens, deployment.id, meta.prompt_tokens, completion_tokens)

        if req.stream:
            return EventSourceResponse(stream_events(started.gen, _SDKChunks(meta), count), ping=_NO_PING_S)
        states = await pipeline.collect(request, started)
        if states is None:
            return Response(status_code=pipeline.CLIENT_CLOSED)
        await count(sum(len(s.token_ids) for s in states))
        return JSONResponse(_body(meta, states))

    return ApiRoute("/v1/inference/chat/completions", endpoint, Operation(
        "Create a chat completion (`model` may also name a deployment or a fine-tune)", "SeekrFlow",
        body=ChatCompletionRequest, response=ChatCompletion, stream=ChatCompletionChunk,
        errors=(400, 404, 429, 503), missing="model", generation=True), methods=["POST"])


def _body(meta: ResponseMeta, states: list[ChoiceState]) -> dict[str, Any]:
    """The whole answer: OpenAI's body, its logprobs also as the SDK's parallel lists."""
    want_logprobs = meta.top_logprobs is not None
    body = protocol.chat_completion(meta.completion_id, meta.created, meta.model, states, meta.decoder,
                                    want_logprobs, meta.prompt_tokens, meta.terminal_ids)
    if want_logprobs:
        for choice, state in zip(body["choices"], states, strict=True):
            hide = protocol.hides_last_token(state.token_ids, state.finish_reason, meta.terminal_ids[state.index])
            choice["logprobs"].update(protocol.completion_logprobs(state.logprobs, meta.decoder, 0, hide))
    return body


class _SDKChunks:
    """Chunks as the SDK parses them: one per token with logprobs, the finish reason and usage on the
    chunk itself (a chunk without choices would break its `choices[0]` loops)."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.offsets = [0] * meta.num_choices
        self.unfinished = meta.num_choices

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        meta = self.meta
        choice = protocol.chat_chunk_choice(index, delta, logprobs, finish_reason)
        body = protocol.chat_chunk(meta.completion_id, meta.created, meta.model, [choice], False)
        body.update(finish_reason=finish_reason, usage=usage)
        return body

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.meta.num_choices)]

    def delta(self, index: int, delta: RequestDelta, completion_tokens: int) -> list[dict[str, Any]]:
        meta = self.meta
        chunks = []
        entries = delta.logprobs if meta.top_logprobs is not None else []
        hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, meta.terminal_ids[index])
        for position, entry in enumerate(entries):
            last = position == len(entries) - 1
            logprobs = _token_logprobs(entry, meta.decoder, self.offsets[index], hide and last)
            self.offsets[index] += len(logprobs["token"])
            # Text that needed several tokens to decode arrives with the last of them.
            chunks.append(self._chunk(index, {"content": delta.text if last else ""}, logprobs))
        if not entries and delta.text:
            chunks.append(self._chunk(index, {"content": delta.text}))
        if delta.finished:
            self.unfinished -= 1
            usage = protocol.usage(meta.prompt_tokens, completion_tokens) if not self.unfinished else None
            chunks.append(self._chunk(index, {}, None, delta.finish_reason, usage))
        return chunks

    def usage(self, usage: dict[str, int]) -> dict[str, Any] | None:
        return None  # on the last choice's finishing chunk
