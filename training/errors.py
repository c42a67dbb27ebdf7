"""What the files store and the job manager refuse, in terms an HTTP layer can map to statuses."""

from __future__ import annotations


class FineTuneError(Exception):
    """A request the fine-tuning API cannot carry out; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(FineTuneError):
    """Bad input (400)."""


class NotFoundError(FineTuneError):
    """No such file or job (404)."""


class ConflictError(FineTuneError):
    """The job is not in a state that allows this (409), e.g. cancelling a finished job."""


class TooLargeError(FineTuneError):
    """An upload over the size limit (413)."""
