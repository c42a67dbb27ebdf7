"""Errors a user can cause by handing Quiver an adapter, each with a message that names the fix.

Every error carries the adapter's name so a registry can report it per adapter (state `failed`)
and the server can turn it into a 400 without parsing the text.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class: something about adapter `adapter` is unusable. `str(err)` is the full message."""

    def __init__(self, adapter: str, message: str) -> None:
        self.adapter = adapter
        self.detail = message
        super().__init__(f"adapter {adapter!r}: {message}")


class AdapterNotFoundError(AdapterError):
    """The directory, `adapter_config.json` or `adapter_model.safetensors` is missing."""


class UnsafeAdapterFormatError(AdapterError):
    """Weights in a pickle-based format (`.bin`, `.pt`, `.pth`); loading them could run code."""


class AdapterConfigError(AdapterError):
    """`adapter_config.json` is malformed or fails PEFT's own validation."""


class UnsupportedAdapterError(AdapterConfigError):
    """A valid PEFT adapter using a feature Quiver does not serve (DoRA, bias training, ...)."""


class AdapterWeightsError(AdapterError):
    """The safetensors file is corrupt, or its tensors disagree with the config or the base model."""


class UnsafeAdapterPathError(AdapterError):
    """A file of an adapter from the adapter root is a link leading out of the root."""
