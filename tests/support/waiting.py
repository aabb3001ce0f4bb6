"""Polling for a condition with a deadline: how tests wait (never `sleep` and hope).

`wait_until` is for async tests (the condition may be a coroutine function);
`wait_until_blocking` is for plain code and threads. Both return the condition's first
true value and fail the test when the deadline passes, unless told to return the last
(false) value so that the caller can explain the failure itself.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(
    condition: Callable[[], Awaitable[T]] | Callable[[], T],
    timeout_s: float = 5.0,
    *,
    interval_s: float = 0.01,
    what: str = "",
    raise_on_timeout: bool = True,
) -> T:
    """Evaluate `condition()` every `interval_s` until it is true; return that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return _checked(value, timeout_s, what or condition, raise_on_timeout)
        await asyncio.sleep(interval_s)


def wait_until_blocking(
    condition: Callable[[], T],
    timeout_s: float = 5.0,
    *,
    interval_s: float = 0.01,
    what: str = "",
    raise_on_timeout: bool = True,
) -> T:
    """`wait_until` for code outside the event loop: blocks the calling thread."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return _checked(value, timeout_s, what or condition, raise_on_timeout)
        time.sleep(interval_s)


def _checked(value: T, timeout_s: float, what: object, raise_on_timeout: bool) -> T:
    if value or not raise_on_timeout:
        return value
    raise AssertionError(f"not within {timeout_s} s: {what} (last value: {value!r:.300})")
