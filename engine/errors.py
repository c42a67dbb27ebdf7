"""Errors the engine raises to its callers; the server maps each to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for errors a caller of the engine can act on."""


class UnknownAdapterError(EngineError):
    """The request names an adapter the engine does not know (HTTP 404 model_not_found)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"The model `{name}` does not exist.")
        self.name = name


class AdapterUnavailableError(EngineError):
    """The adapter is known but cannot serve (failed to load, being removed). HTTP 4xx."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"Adapter `{name}` cannot serve requests: {reason}")
        self.name = name
        self.reason = reason


class AdapterFailedError(AdapterUnavailableError):
    """The adapter failed to load or validate (registry state `failed`). HTTP 400 with the reason."""


class EngineOverloadedError(EngineError):
    """Too many queued requests (HTTP 429 with Retry-After)."""


class RequestTooLongError(EngineError, ValueError):
    """Prompt plus max_tokens does not fit max_model_len (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an unrecoverable error (HTTP 503)."""
