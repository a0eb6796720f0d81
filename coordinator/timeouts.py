"""Waiting with a deadline, the same on every supported Python.

NOTE: `asyncio.wait_for` raises `asyncio.TimeoutError`, which is the builtin `TimeoutError`
only from Python 3.11; on 3.10 `except TimeoutError` misses it. Every deadline in the
coordinator goes through here, which catches both.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; whether it was set.

    NOTE: not `asyncio.wait_for`: before Python 3.12 it swallows a cancel that arrives just
    as the event is set, so a request whose client left would stay in the KV wait queue."""
    if event.is_set():
        return True
    waiting = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=timeout_s)
    finally:
        waiting.cancel()
    return bool(done)
