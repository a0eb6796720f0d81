"""Sending conversations: a turn goes out only once the previous turn's answer has arrived.

Several conversations are in flight at once, as chat users are:
- open loops (`poisson:R`, `constant:R`): conversation i starts at the schedule's i-th
  offset, so R is conversations per second;
- `closed:C`: C users, each holding one conversation at a time, taking the next when
  theirs is over (with `--duration`, no new conversation starts after it; started
  ones finish).
Within a conversation, turn k+1 is scheduled when turn k's stream ended, plus the
think time; its TTFT from the schedule therefore starts there. `--max-inflight` caps
requests in flight, as for single requests. A failed turn ends its conversation: there
is no answer to resend, so its later turns are never sent (and have no record).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from bench.serving.client import send
from bench.serving.conversation import Conversation
from bench.serving.record import RequestRecord

if TYPE_CHECKING:
    from bench.serving.runner import RunPlan

TurnBody = Callable[[Conversation, list[str]], bytes]
"""(conversation, replies to its earlier turns) -> the body of its next turn."""


async def drive_conversations(
    plan: RunPlan,
    url: str,
    turn_body: TurnBody,
    records: list[RequestRecord],
    client: httpx.AsyncClient,
    start_ns: int,
    inflight: asyncio.Semaphore | None,
) -> None:
    """Every conversation of the plan, on its schedule; `records` is indexed like the workload."""
    sender = _Sender(plan, url, turn_body, records, client, start_ns, inflight)
    offsets_s = plan.schedule.offsets_s
    if offsets_s is not None:
        starts = zip(plan.conversations, offsets_s)
        await asyncio.gather(*(sender.converse(c, int(offset_s * 1e9)) for c, offset_s in starts))
        return
    pending = iter(plan.conversations)
    deadline_ns = None if plan.duration_s is None else start_ns + int(plan.duration_s * 1e9)

    async def user() -> None:
        for conversation in pending:
            if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
                return
            await sender.converse(conversation, None)

    await asyncio.gather(*(user() for _ in range(plan.schedule.concurrency or 1)))


@dataclass
class _Sender:
    """What every conversation of one pass shares: the plan, the client, the clock."""

    plan: RunPlan
    url: str
    turn_body: TurnBody
    records: list[RequestRecord]
    client: httpx.AsyncClient
    start_ns: int
    """perf_counter_ns() at the start of the pass; record times are relative to it."""
    inflight: asyncio.Semaphore | None

    def now_ns(self) -> int:
        return time.perf_counter_ns() - self.start_ns

    async def converse(self, conversation: Conversation, first_ns: int | None) -> None:
        """One conversation's turns in order; first_ns: turn 1's scheduled time (None: now)."""
        replies: list[str] = []
        ready_ns = self.now_ns() if first_ns is None else first_ns
        for index in conversation.request_indices:
            record = self.records[index]
            await self._turn(conversation, replies, record, ready_ns)
            if not record.is_ok:
                return
            replies.append(record.reply or "")
            ready_ns = record.end_ns + int(self.plan.think_time_s * 1e9)

    async def _turn(
        self, conversation: Conversation, replies: list[str], record: RequestRecord, ready_ns: int
    ) -> None:
        record.scheduled_ns = record.slot_ns = ready_ns
        delay_s = (ready_ns - self.now_ns()) / 1e9
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if self.inflight is not None:
            was_full = self.inflight.locked()
            await self.inflight.acquire()
            if was_full:  # NOTE: keeps its scheduled time; only the lag is measured from here
                record.slot_ns = self.now_ns()
        try:
            body = self.turn_body(conversation, replies)
            timeout_s = self.plan.options.timeout_s
            await send(self.client, self.url, body, record, self.start_ns, timeout_s, True)
        finally:
            if self.inflight is not None:
                self.inflight.release()
