"""The OpenAI surface's routes: chat and legacy completions, models."""

from __future__ import annotations

from server.http.routing import ApiRoute, Operation
from server.openai.answers import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    ModelList,
)
from server.openai.chat import chat_completions
from server.openai.completions import completions
from server.openai.models import list_models, retrieve_model
from server.openai.schemas import ChatCompletionRequest, CompletionRequest

TAG = "OpenAI"
GENERATION_ERRORS = (400, 404, 429, 503)

routes = [
    ApiRoute("/v1/chat/completions", chat_completions, Operation(
        "Create a chat completion", TAG, body=ChatCompletionRequest, response=ChatCompletion,
        stream=ChatCompletionChunk, errors=GENERATION_ERRORS, missing="model", generation=True), methods=["POST"]),
    ApiRoute("/v1/completions", completions, Operation(
        "Create a (legacy) text completion", TAG, body=CompletionRequest, response=Completion,
        stream=CompletionChunk, errors=GENERATION_ERRORS, missing="model", generation=True), methods=["POST"]),
    ApiRoute("/v1/models", list_models, Operation(
        "List the base model and its adapters", TAG, response=ModelList, errors=(503,)), methods=["GET"]),
    ApiRoute("/v1/models/{model:path}", retrieve_model, Operation(
        "Describe one model (the base or an adapter)", TAG, response=Model, errors=(404, 503), missing="model"),
        methods=["GET"]),
]
