"""Draining a worker on SIGTERM: leave the rotation, finish what is in flight, then exit.

A rolling restart must lose nothing, so a worker asked to stop first tells the
coordinator it is draining (a heartbeat with `draining` set, sent at once; the
registry then places no new work on it), waits one heartbeat interval for
placements the coordinator made just before it heard (their Allocate or
Prefill may still be on the wire), then waits until it holds no sequence and
no pending KV handle. A second SIGTERM or `timeout_s` cuts the wait short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from disagg.rpc import control_pb2 as pb
from disagg.rpc.registration import WorkerRegistration

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How often the in-flight count is checked while draining."""
DRAIN_SETTLE_S = 0.5
"""Wait for RPCs the coordinator sent before it heard of the drain (they take milliseconds)."""
DRAIN_TIMEOUT_S = 300.0
"""Longest drain: a generation of a few thousand tokens on a slow CPU."""


def is_idle(status: pb.HeartbeatRequest) -> bool:
    """No sequence, no pending KV handle or KV send in flight (all counted in `load`)."""
    return status.load == 0


async def drain(
    registration: WorkerRegistration,
    status: Callable[[], pb.HeartbeatRequest],
    settle_s: float,
    timeout_s: float,
    cut_short: asyncio.Event,
) -> bool:
    """Leave the rotation and wait until idle; True if it got there in time."""
    worker_id = registration.info.worker_id
    if not await registration.leave_rotation():
        log.warning("could not tell the coordinator that %s is draining", worker_id)
    deadline_s = time.monotonic() + timeout_s
    settle_until_s = time.monotonic() + settle_s
    while time.monotonic() < deadline_s and not cut_short.is_set():
        if time.monotonic() >= settle_until_s and is_idle(status()):
            return True
        await asyncio.sleep(POLL_S)
    log.warning("%s stopped draining with %d in flight", worker_id, status().load)
    return False
