"""vLLM's tokenizer routes and the version: `POST /tokenize`, `POST /detokenize`, `GET /version`.

`/tokenize` takes a `prompt` (tokenized as /v1/completions does, special tokens added) or
`messages` (rendered with the chat template as /v1/chat/completions does, so `count` is the
chat completion's `prompt_tokens`) and answers `{"count", "max_model_len", "tokens"}`;
`/detokenize` takes `tokens` and answers `{"prompt"}`. `model` may name the base model or any
adapter (they share the tokenizer); an unknown name is a 404 as on the /v1 routes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.http import off_loop
from server.http.errors import APIError, bad_request, from_validation_error, parse_json_body
from server.http.routing import ApiRoute, Operation
from server.openai.answers import DetokenizeResult, TokenizeResult, VersionInfo
from server.openai.chat_template import apply_chat_template, render_messages
from server.openai.schemas import FIELD_NAMES, MAX_MESSAGES, ChatMessage, _Tolerant
from server.openai.unsupported import refuse_content_parts
from server.state import ServerState
from server.version import VERSION

TAG = "vLLM"


class TokenizeCompletion(_Tolerant, title="TokenizeCompletionRequest"):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(_Tolerant, title="TokenizeChatRequest"):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes any BOS itself
    return_token_strs: bool = False


class Detokenize(_Tolerant, title="DetokenizeRequest"):
    model: str | None = None
    tokens: list[int]


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], body: dict[str, Any]) -> M:
    """`model` from `body`; a 400 naming the field (these fields are not the /v1 routes' own)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = from_validation_error(exc, FIELD_NAMES)
        first = exc.errors(include_url=False)[0].get("loc", ())
        if error.param is None and first and first[0] in model.model_fields:
            error = APIError(400, f"Invalid value for `{first[0]}`: {exc.errors()[0]['msg']}", param=str(first[0]),
                             code="invalid_value")
        raise error from None


def _state(request: Request) -> ServerState:
    return request.app.state.quiver


def _tokenize(state: ServerState, body: dict[str, Any]) -> dict[str, Any]:
    engine = state.require_engine()
    tokenizer = engine.tokenizer
    if "messages" in body:
        refuse_content_parts(body.get("messages"))
        chat = _validated(TokenizeChat, body)
        state.resolve_model(chat.model)
        return_strs = chat.return_token_strs
        if chat.add_generation_prompt and not chat.add_special_tokens:
            ids = apply_chat_template(tokenizer, chat.messages)  # exactly what a chat completion sees
        else:
            ids = _templated(tokenizer, chat)
    else:
        if "prompt" not in body:
            raise bad_request("Give `prompt` (a string) or `messages` (a conversation).", param="prompt")
        completion = _validated(TokenizeCompletion, body)
        state.resolve_model(completion.model)
        return_strs = completion.return_token_strs
        ids = list(tokenizer.encode(completion.prompt, add_special_tokens=completion.add_special_tokens))
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    if return_strs:
        answer["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return answer


def _templated(tokenizer: Any, chat: TokenizeChat) -> list[int]:
    from server.openai.chat_template import CHATML_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(render_messages(chat.messages), chat_template=template,
                                             add_generation_prompt=chat.add_generation_prompt, tokenize=False)
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    return list(tokenizer.encode(text, add_special_tokens=chat.add_special_tokens))


def _detokenize(state: ServerState, body: dict[str, Any]) -> dict[str, Any]:
    engine = state.require_engine()
    req = _validated(Detokenize, body)
    state.resolve_model(req.model)
    vocab_size = len(engine.tokenizer)
    for position, token_id in enumerate(req.tokens):
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"tokens[{position}] = {token_id} is not a token id of this model (vocabulary size "
                              f"{vocab_size}).", param="tokens")
    return {"prompt": engine.tokenizer.decode(req.tokens)}


async def _answer(request: Request, work: Any) -> Response:
    raw = await request.body()
    body = await parse_json_body(request)
    await _state(request).discover_in(body)
    if off_loop.is_large(raw):  # tokenizing megabytes would stall every other request
        return JSONResponse(await off_loop.run_off_loop(work, _state(request), body))
    return JSONResponse(work(_state(request), body))


async def tokenize(request: Request) -> Response:
    return await _answer(request, _tokenize)


async def detokenize(request: Request) -> Response:
    return await _answer(request, _detokenize)


async def version(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


def tokenize_routes() -> list[ApiRoute]:
    return [
        ApiRoute("/tokenize", tokenize, Operation(
            "Tokenize a prompt, or a conversation as chat completions render it (vLLM's shape)", TAG,
            body=(TokenizeCompletion, TokenizeChat), response=TokenizeResult, errors=(400, 404, 503),
            missing="model"), methods=["POST"]),
        ApiRoute("/detokenize", detokenize, Operation(
            "Turn token ids back into text (vLLM's shape)", TAG, body=Detokenize, response=DetokenizeResult,
            errors=(400, 404, 503), missing="model"), methods=["POST"]),
        ApiRoute("/version", version, Operation("Quiver's version", TAG, response=VersionInfo), methods=["GET"]),
    ]
