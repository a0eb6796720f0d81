"""Weighted fair queuing in the KV wait queue: pure asyncio, no workers, no model."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.admission import Admission, OverloadedError
from disagg.config import ConfigError, CoordinatorConfig


class Room:
    """KV room as slots: each admitted request takes one; records who got them, in order."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.num_slots = 0
        self.order: list[str] = []

    def taker(self, name: str):
        async def try_admit() -> str | None:
            await asyncio.sleep(0)  # a real try awaits a worker: others run meanwhile
            if self.num_slots <= 0:
                return None
            self.num_slots -= 1
            self.order.append(name)
            return name

        return try_admit

    def request(self, name: str, tenant: str, priority: int = 0) -> asyncio.Task:
        return asyncio.create_task(self.admission.admit(self.taker(name), tenant, priority))

    async def free(self, num_slots: int = 1) -> None:
        """Free slots one at a time, each taken before the next is freed."""
        for _ in range(num_slots):
            taken = len(self.order)
            self.num_slots += 1
            self.admission.notify()
            await until(lambda taken=taken: len(self.order) > taken)


async def until(condition, num_polls: int = 2000) -> None:
    for _ in range(num_polls):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def queue_up(room: Room, names_by_tenant: list[tuple[str, str]]) -> list[asyncio.Task]:
    tasks = []
    for name, tenant in names_by_tenant:
        tasks.append(room.request(name, tenant))
        num_tasks = len(tasks)
        await until(lambda num_tasks=num_tasks: room.admission.num_waiting == num_tasks)
    return tasks


def test_a_burst_does_not_starve_a_tenant_that_arrives_after_it():
    async def scenario() -> list[str]:
        room = Room(Admission(max_waiting=64, queue_timeout_s=30))
        burst = [(f"a{i}", "A") for i in range(20)]
        tasks = await queue_up(room, [*burst, ("b0", "B")])
        await room.free(21)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return room.order

    order = asyncio.run(scenario())
    assert order.index("b0") <= 1  # behind at most the head of A's burst, not all 20
    assert [n for n in order if n.startswith("a")] == [f"a{i}" for i in range(20)]  # FIFO


def test_backlogged_tenants_are_served_in_proportion_to_their_weights():
    async def scenario() -> list[str]:
        room = Room(Admission(max_waiting=64, queue_timeout_s=30, tenant_weights={"A": 3}))
        names = [(f"a{i}", "A") for i in range(16)] + [(f"b{i}", "B") for i in range(16)]
        tasks = await queue_up(room, names)
        await room.free(16)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return room.order

    order = asyncio.run(scenario())
    num_a = sum(n.startswith("a") for n in order)
    assert (num_a, len(order) - num_a) == (12, 4)
    assert asyncio.run(scenario()) == order  # deterministic


def test_priority_orders_a_tenants_own_requests_but_not_another_tenants_share():
    async def scenario() -> list[str]:
        room = Room(Admission(max_waiting=64, queue_timeout_s=30))
        tasks = [room.request("a-low", "A", priority=5)]
        await until(lambda: room.admission.num_waiting == 1)
        tasks.append(room.request("b0", "B"))
        await until(lambda: room.admission.num_waiting == 2)
        tasks.append(room.request("a-urgent", "A", priority=-5))
        await until(lambda: room.admission.num_waiting == 3)
        await room.free(3)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return room.order

    assert asyncio.run(scenario()) == ["a-urgent", "b0", "a-low"]


def test_a_wake_taken_by_a_new_head_is_handed_on_not_lost():
    """Room appears for the head, then a request that goes before it arrives: the room is
    the new head's, and the old head still gets the next room."""

    async def scenario() -> list[str]:
        admission = Admission(max_waiting=64, queue_timeout_s=30, tenant_weights={"B": 4})
        room = Room(admission)
        first = room.request("a0", "A")
        await until(lambda: admission.num_waiting == 1)
        room.num_slots = 1
        admission.notify()  # a0's flag is set, a0 has not run yet
        late = room.request("b0", "B")  # a smaller virtual finish tag: the head now
        await asyncio.wait_for(late, 5)
        await room.free(1)
        await asyncio.wait_for(first, 5)
        assert admission.num_waiting == 0
        return room.order

    assert asyncio.run(scenario()) == ["b0", "a0"]


def test_racing_notifies_admit_every_waiter():
    """Room freed at arbitrary moments (during tries included) reaches every waiter."""

    async def scenario() -> int:
        admission = Admission(max_waiting=64, queue_timeout_s=30)
        room = Room(admission)
        tasks = [room.request(f"{t}{i}", t) for i in range(8) for t in "ABC"]

        async def free_racily() -> None:
            for step in range(24):
                for _ in range(step % 3):
                    await asyncio.sleep(0)
                room.num_slots += 1
                admission.notify()

        await free_racily()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return len(room.order)

    assert asyncio.run(scenario()) == 24


def test_a_head_whose_try_fails_wakes_the_next():
    async def scenario() -> list[str]:
        admission = Admission(max_waiting=64, queue_timeout_s=30)
        room = Room(admission)

        async def broken() -> str | None:
            if room.num_slots:
                raise RuntimeError("the worker refused")
            return None

        failing = asyncio.create_task(admission.admit(broken, "A"))
        await until(lambda: admission.num_waiting == 1)
        blocked = room.request("b0", "B")
        await until(lambda: admission.num_waiting == 2)
        room.num_slots = 1
        admission.notify()  # the head, A's, fails its try: B's must try now
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(failing, 5)
        await asyncio.wait_for(blocked, 5)
        return room.order

    assert asyncio.run(scenario()) == ["b0"]


def test_a_cancelled_waiter_leaves_even_as_it_is_woken():
    async def scenario() -> None:
        admission = Admission(max_waiting=64, queue_timeout_s=30)
        room = Room(admission)
        head, nxt = await queue_up(room, [("a0", "A"), ("b0", "B")])
        room.num_slots = 1
        admission.notify()  # a0's flag is set ...
        head.cancel()  # ... and its client leaves before it runs
        await asyncio.wait_for(nxt, 5)
        assert head.cancelled() and room.order == ["b0"]

    asyncio.run(scenario())


def test_a_full_line_gives_the_longest_tenants_newest_place_to_another_tenant():
    async def scenario() -> None:
        admission = Admission(max_waiting=4, queue_timeout_s=30)
        room = Room(admission)
        burst = await queue_up(room, [(f"a{i}", "A") for i in range(4)])
        with pytest.raises(OverloadedError, match="already waiting"):
            await admission.admit(room.taker("a4"), "A")  # its own burst: refused
        other = room.request("b0", "B")
        with pytest.raises(OverloadedError, match="queue is full"):
            await asyncio.wait_for(burst[-1], 5)  # the newest of A's gave up its place
        assert admission.num_waiting == 4
        await room.free(4)
        await asyncio.wait_for(asyncio.gather(other, *burst[:3]), 5)
        assert room.order.index("b0") <= 1
        assert admission.num_waiting == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("text", ["A", "A=0", "A=-1", "A=nan", "A=inf", "=2", "A=x"])
def test_tenant_weights_that_are_not_positive_numbers_fail_at_startup(text):
    with pytest.raises(ConfigError, match="tenant_weights"):
        CoordinatorConfig(tenant_weights=text)


def test_tenant_weights_parse_as_shares():
    config = CoordinatorConfig(tenant_weights="A=3, B=0.5,")
    assert config.tenant_weight_map == {"A": 3.0, "B": 0.5}
