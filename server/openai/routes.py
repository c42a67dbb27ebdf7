"""The OpenAI surface's routes: chat and legacy completions, models."""

from __future__ import annotations

from starlette.routing import Route

from server.openai.chat import chat_completions
from server.openai.completions import completions
from server.openai.models import list_models, retrieve_model

routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
