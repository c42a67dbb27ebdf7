"""`POST /v1/inference/chat/completions`: chat completions for the `seekrai` SDK.

The same engine path as `/v1/chat/completions`; what differs is the shape. `model` may name a
deployment (it must be promoted), a fine-tune, an adapter or the base model. The SDK always
sends `max_tokens` (512 unless told otherwise), so a budget longer than the context is cut to
fit instead of refused. Logprobs carry the SDK's fields next to OpenAI's: a streamed chunk
describes exactly one token (`token`, `token_logprob`, `top_logprobs` as {token: logprob},
`text_offset`) and also holds OpenAI's `content` list for it; a whole answer holds the
parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and `content`.
A `top_logprobs` above 20 is a 400, which the SDK raises as its `InvalidRequestError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from server import protocol
from server.chat import apply_chat_template
from server.deployments import Deployments
from server.errors import APIError, bad_request, from_engine_error, parse_json_body
from server.generation import ChoiceRequest, ClientDisconnected, MergedGeneration, unless_disconnected
from server.params import build_sampling_params, check_chat_request
from server.protocol import ChoiceState
from server.schemas import ChatCompletionRequest
from server.state import ServerState
from server.store import Deployment, Store
from server.streaming import failed_delta_error
from server.structured import StructuredOutputs
from training.errors import NotFoundError
from training.jobs import JobManager

_CLIENT_CLOSED = 499
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


def _event(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)}


def chat_route(state: ServerState, store: Store, jobs: JobManager, deployments: Deployments) -> Route:
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
        adapter = state.resolve_model(model)
        return adapter, await deployments.find_serving(adapter)

    async def endpoint(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate(_to_openai(await parse_json_body(request)))
        check_chat_request(req)
        engine = state.require_engine()
        adapter, deployment = await resolve(req.model)
        model = req.model or engine.model_name
        prompt_ids = apply_chat_template(engine.tokenizer, req.messages)
        params, processors = await _sampling(state, engine, req, len(prompt_ids))
        completion_id = protocol.new_id("chatcmpl")
        gen = MergedGeneration(engine, [ChoiceRequest(i, f"{completion_id}-{i}", prompt_ids, params[i], adapter,
                                                      processors[i]) for i in range(req.n)])
        terminal = [(set() if p.ignore_eos else set(engine.eos_token_ids)) | set(p.stop_token_ids) for p in params]
        answer = _Answer(completion_id, model, engine, req.n, len(prompt_ids), req.wanted_top_logprobs() is not None,
                         terminal)
        if not await _started(request, gen, model):
            return Response(status_code=_CLIENT_CLOSED)

        async def count() -> None:
            if deployment is not None:
                await asyncio.to_thread(store.count_tokens, deployment.id, answer.prompt_tokens,
                                        answer.completion_tokens())

        if req.stream:
            return EventSourceResponse(answer.events(gen, count), ping=_NO_PING_S)
        try:
            await unless_disconnected(request, answer.collect(gen))
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        finally:
            await gen.aclose()
        await count()
        return JSONResponse(answer.body())

    return Route("/v1/inference/chat/completions", endpoint, methods=["POST"])


async def _sampling(state: ServerState, engine: Any, req: ChatCompletionRequest,
                    prompt_len: int) -> tuple[list[SamplingParams], list[Any]]:
    """Each choice's sampling parameters and logits processor (structured output), or a 400."""
    room = engine.max_model_len - prompt_len
    if room < 1:
        raise bad_request(f"The prompt is {prompt_len} tokens long; this model's context is "
                          f"{engine.max_model_len} tokens.", param="messages", code="context_length_exceeded")
    wanted = req.wanted_max_tokens()
    max_tokens = room if wanted is None else min(wanted, room)
    params = [build_sampling_params(req, max_tokens=max_tokens, top_logprobs=req.wanted_top_logprobs(),
                                    vocab_size=len(engine.tokenizer), choice_index=i) for i in range(req.n)]
    processors: list[Any] = [None] * req.n
    schema = StructuredOutputs.schema_of(req.response_format)
    if schema is not None:
        if state.structured is None:
            state.structured = StructuredOutputs(engine.tokenizer, set(engine.eos_token_ids))
        processors = await asyncio.to_thread(state.structured.processors, schema, req.n)
    return params, processors


async def _started(request: Request, gen: MergedGeneration, model: str) -> bool:
    """Start the engine requests and wait for their first deltas; False if the client left first."""
    gen.start()
    try:
        await unless_disconnected(request, gen.first_deltas())
    except BaseException as exc:
        await gen.aclose()
        if isinstance(exc, ClientDisconnected):
            return False
        if isinstance(exc, Exception) and not isinstance(exc, APIError):
            raise from_engine_error(exc, model) from None
        raise
    return True


class _Answer:
    """One request's choices as they grow, and the bodies and chunks made from them."""

    def __init__(self, completion_id: str, model: str, decoder: Any, n: int, prompt_tokens: int,
                 want_logprobs: bool, terminal_ids: list[set[int]]) -> None:
        self.completion_id, self.model, self.decoder = completion_id, model, decoder
        self.created = protocol.now()
        self.prompt_tokens = prompt_tokens
        self.want_logprobs = want_logprobs
        self.terminal_ids = terminal_ids
        self.states = [ChoiceState(index=i) for i in range(n)]

    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.states)

    def _usage(self) -> dict[str, int]:
        return protocol.usage(self.prompt_tokens, self.completion_tokens())

    async def collect(self, gen: MergedGeneration) -> None:
        async for index, delta in gen:
            if delta.finish_reason in ("error", "abort"):
                raise failed_delta_error(delta)
            state = self.states[index]
            state.text += delta.text
            state.token_ids.extend(delta.token_ids)
            state.logprobs.extend(delta.logprobs)
            if delta.finished:
                state.finish_reason = delta.finish_reason

    def body(self) -> dict[str, Any]:
        body = protocol.chat_completion(self.completion_id, self.created, self.model, self.states, self.decoder,
                                        self.want_logprobs, self.prompt_tokens, self.terminal_ids)
        if self.want_logprobs:
            for choice, state in zip(body["choices"], self.states, strict=True):
                hide = protocol.hides_last_token(state.token_ids, state.finish_reason, self.terminal_ids[state.index])
                choice["logprobs"].update(protocol.completion_logprobs(state.logprobs, self.decoder, 0, hide))
        return body

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, str]:
        choice = protocol.chat_chunk_choice(index, delta, logprobs, finish_reason)
        body = protocol.chat_chunk(self.completion_id, self.created, self.model, [choice], False)
        body.update(finish_reason=finish_reason, usage=usage)
        return _event(body)

    async def events(self, gen: MergedGeneration, on_done: Any) -> AsyncIterator[dict[str, str]]:
        offsets = [0] * len(self.states)
        finished = 0
        try:
            for state in self.states:
                yield self._chunk(state.index, {"role": "assistant", "content": ""})
            async for index, delta in gen:
                if delta.finish_reason in ("error", "abort"):
                    raise failed_delta_error(delta)
                self.states[index].token_ids.extend(delta.token_ids)
                entries = delta.logprobs if self.want_logprobs else []
                hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, self.terminal_ids[index])
                for position, entry in enumerate(entries):
                    last = position == len(entries) - 1
                    logprobs = _token_logprobs(entry, self.decoder, offsets[index], hide and last)
                    offsets[index] += len(logprobs["token"])
                    # Text that needed several tokens to decode arrives with the last of them.
                    yield self._chunk(index, {"content": delta.text if last else ""}, logprobs)
                if not entries and delta.text:
                    yield self._chunk(index, {"content": delta.text})
                if delta.finished:
                    finished += 1
                    # Usage rides on the last chunk: a chunk without choices would break `choices[0]` loops.
                    usage = self._usage() if finished == len(self.states) else None
                    yield self._chunk(index, {}, None, delta.finish_reason, usage)
        except Exception as exc:
            body = exc.body() if isinstance(exc, APIError) else APIError(
                500, "Internal server error while streaming.", type="server_error", code="internal_error").body()
            yield _event(body)
        finally:
            await gen.aclose()
            with anyio.CancelScope(shield=True):  # a client that left still used the tokens
                await on_done()
        yield {"data": "[DONE]"}
