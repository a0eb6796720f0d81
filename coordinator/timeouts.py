"""Waiting with a deadline, the same on every supported Python.

NOTE: `asyncio.wait_for` raises `asyncio.TimeoutError`, which is the builtin `TimeoutError`
only from Python 3.11; on 3.10 `except TimeoutError` misses it. Every deadline in the
coordinator goes through here, which catches both.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; whether it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):  # NOTE: looked up at raise time; see module
        return False
    return True
