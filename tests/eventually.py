"""One way for a test to wait for something that happens on another thread or process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.01) -> T:
    """What `predicate()` returns once it is truthy; AssertionError naming `what` after `timeout` seconds.

    The predicate is tried once more at the deadline, so a slow machine never fails a check that
    holds by then.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)
