"""The KV handle lifecycle on a real block manager and cache, without sockets."""

from __future__ import annotations

import pytest
import torch

from decode_worker.kv_handle import FreeReason, HandleHooks, HandleState, owner_of
from decode_worker.kv_handles import HandleTable
from disagg.errors import OutOfBlocksError
from disagg.kv.block_manager import BlockManager
from disagg.kv.cache import KVLayout, PagedKVCache
from disagg.kv.wire import DoneHeader, LayerHeader, combine, frame_checksum

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)


class Recorder(HandleHooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def on_allocate(self, handle) -> None:
        self.events.append(("allocate", handle.handle_id))

    def on_layer_received(self, handle, layer, num_tokens) -> None:
        self.events.append((f"layer{layer}", handle.handle_id))

    def on_ready(self, handle) -> None:
        self.events.append(("ready", handle.handle_id))

    def on_free(self, handle, reason) -> None:
        self.events.append((f"free:{reason}", handle.handle_id))


@pytest.fixture
def table_and_hooks() -> tuple[HandleTable, Recorder]:
    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    hooks = Recorder()
    return HandleTable(manager, cache, ready_timeout_s=5, claim_timeout_s=5, hooks=[hooks]), hooks


def send_prompt(table: HandleTable, handle, corrupt: bool = False) -> dict[int, tuple]:
    """Deliver every layer of the handle's prompt as the receiver would; returns what was sent."""
    n = handle.num_prompt_tokens
    sent, checksum = {}, 0
    for layer in range(LAYOUT.num_layers):
        k, v = torch.randn(n, 2, 4), torch.randn(n, 2, 4)
        header = LayerHeader(handle.handle_id, layer, 0, n, "float32", (n, 2, 4))
        checksum = combine(checksum, frame_checksum(layer, 0, k, v))
        received = k.clone()
        if corrupt and layer == 1:
            received[0, 0, 0] += 1.0
        table.on_layer(header, received, v, frame_checksum(layer, 0, received, v))
        sent[layer] = (k, v)
    table.on_done(DoneHeader(handle.handle_id, n, LAYOUT.num_layers, checksum, 0))
    return sent


def test_full_lifecycle_writes_kv_into_the_handles_blocks(table_and_hooks):
    table, hooks = table_and_hooks
    handle = table.allocate("r1", list(range(6)), max_new_tokens=5)
    assert len(handle.block_ids) == 3 and handle.state == HandleState.ALLOCATED
    sent = send_prompt(table, handle)
    assert handle.state == HandleState.READY and handle.settled.is_set()
    for layer, (k, v) in sent.items():
        slots = torch.tensor(table.kv_cache.slot_ids(handle.block_ids, 0, 6))
        got_k, got_v = table.kv_cache.gather(layer, slots)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert table.claim(handle.handle_id) is handle and handle.state == HandleState.DECODING
    # a decoding sequence owns the blocks now: ending the handle must not free them
    assert table.release(handle.handle_id)
    assert table.block_manager.num_free_blocks == 16 - 3
    table.block_manager.free(handle.block_ids)
    names = [name for name, _ in hooks.events]
    assert names == ["allocate", "layer0", "layer1", "ready", "free:finished"]


def test_checksum_mismatch_fails_and_frees(table_and_hooks):
    table, hooks = table_and_hooks
    handle = table.allocate("r2", list(range(6)), max_new_tokens=2)
    send_prompt(table, handle, corrupt=True)
    assert handle.state == HandleState.FREED and handle.free_reason == FreeReason.CHECKSUM_MISMATCH
    assert table.end_reason(handle.handle_id) == FreeReason.CHECKSUM_MISMATCH
    assert table.claim(handle.handle_id) is None
    assert table.block_manager.num_free_blocks == 16


def test_frames_for_unknown_freed_or_complete_handles_are_dropped_not_written(table_and_hooks):
    table, _ = table_and_hooks
    stray = LayerHeader("nope", 0, 0, 2, "float32", (2, 2, 4))
    table.on_layer(stray, torch.ones(2, 2, 4), torch.ones(2, 2, 4), 0)
    handle = table.allocate("r3", list(range(4)), max_new_tokens=1)
    send_prompt(table, handle)
    late = LayerHeader(handle.handle_id, 0, 0, 4, "float32", (4, 2, 4))
    before = table.kv_cache.k[0].clone()
    table.on_layer(late, torch.full((4, 2, 4), 9.0), torch.zeros(4, 2, 4), 0)
    past_prompt = LayerHeader(handle.handle_id, 0, 2, 6, "float32", (4, 2, 4))
    table.on_layer(past_prompt, torch.ones(4, 2, 4), torch.ones(4, 2, 4), 0)
    assert torch.equal(table.kv_cache.k[0], before)
    assert table.num_dropped_frames == 3


def test_incomplete_transfer_fails(table_and_hooks):
    table, _ = table_and_hooks
    handle = table.allocate("r4", list(range(4)), max_new_tokens=1)
    table.on_done(DoneHeader(handle.handle_id, 4, LAYOUT.num_layers, 0, 0))
    assert handle.free_reason == FreeReason.INCOMPLETE
    assert table.block_manager.num_free_blocks == 16


def test_handles_never_ready_or_never_claimed_expire(table_and_hooks):
    table, hooks = table_and_hooks
    waiting = table.allocate("r5", list(range(4)), max_new_tokens=1)
    ready = table.allocate("r6", list(range(4)), max_new_tokens=1)
    send_prompt(table, ready)
    assert table.expire(now_s=waiting.deadline_s - 1) == []
    expired = table.expire(now_s=max(waiting.deadline_s, ready.deadline_s) + 1)
    assert set(expired) == {waiting.handle_id, ready.handle_id}
    assert table.block_manager.num_free_blocks == 16 and len(table) == 0
    assert ("free:expired", ready.handle_id) in hooks.events


def test_allocation_beyond_the_pool_is_out_of_blocks_and_changes_nothing(table_and_hooks):
    table, _ = table_and_hooks
    with pytest.raises(OutOfBlocksError):
        table.allocate("big", list(range(60)), max_new_tokens=10)
    assert len(table) == 0 and table.block_manager.num_free_blocks == 16


def test_a_failing_hook_does_not_break_the_lifecycle(table_and_hooks):
    table, _ = table_and_hooks

    class Broken(HandleHooks):
        def on_ready(self, handle) -> None:
            raise RuntimeError("boom")

    table.hooks.append(Broken())
    handle = table.allocate("r7", list(range(4)), max_new_tokens=1)
    send_prompt(table, handle)
    assert handle.state == HandleState.READY


def test_a_handle_shares_a_cached_prefix_and_drops_frames_that_would_overwrite_it():
    from disagg.kv.prefix_cache import PrefixCache

    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    table = HandleTable(manager, cache, 5, 5, prefix_cache=PrefixCache(manager, "m"))
    prompt = list(range(10))
    first = table.allocate("r1", prompt, max_new_tokens=2)
    assert first.num_cached_tokens == 0
    sent = send_prompt(table, first)
    assert first.state == HandleState.READY
    table.release(first.handle_id)  # unclaimed: its blocks go back, registered ones cached
    assert manager.num_free_blocks == 16 and manager.num_cached_blocks == 2

    second = table.allocate("r2", [*prompt, 10, 11], max_new_tokens=2)
    assert second.num_cached_tokens == 8 and second.block_ids[:2] == first.block_ids[:2]
    n = 12
    k, v = torch.zeros(n, 2, 4), torch.zeros(n, 2, 4)
    header = LayerHeader(second.handle_id, 0, 0, n, "float32", (n, 2, 4))
    table.on_layer(header, k, v, frame_checksum(0, 0, k, v))  # tries to overwrite the prefix
    assert table.num_dropped_frames == 1
    slots = torch.tensor(cache.slot_ids(second.block_ids, 0, 8))
    assert torch.equal(cache.gather(0, slots)[0], sent[0][0][:8])

    checksum = 0
    for layer in range(LAYOUT.num_layers):  # the suffix only, as a prefill worker ships it
        k, v = torch.randn(4, 2, 4), torch.randn(4, 2, 4)
        header = LayerHeader(second.handle_id, layer, 8, 12, "float32", (4, 2, 4))
        table.on_layer(header, k, v, frame_checksum(layer, 8, k, v))
        checksum = combine(checksum, frame_checksum(layer, 8, k, v))
    table.on_done(DoneHeader(second.handle_id, n, LAYOUT.num_layers, checksum, 0))
    assert second.state == HandleState.READY
    table.release(second.handle_id)
    assert manager.num_free_blocks == 16 and manager.num_cached_blocks == 3


def test_handle_ids_name_the_incarnation_that_minted_them():
    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    table = HandleTable(manager, cache, worker_id="decode-0-e2")
    handle = table.allocate("r", list(range(4)), max_new_tokens=1)
    assert owner_of(handle.handle_id) == "decode-0-e2"
    assert table.stale_owner(handle.handle_id) is None
    assert table.stale_owner("decode-0-e1/" + "0" * 32) == "decode-0-e1"


def test_frames_for_a_previous_incarnations_handle_are_dropped_and_counted():
    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    old = HandleTable(manager, cache, worker_id="decode-0-e1")
    new = HandleTable(manager, cache, worker_id="decode-0-e2")
    # NOTE: the old life's handle, in a table that (by accident) knows its id too: the
    # owner in the id alone must keep its frames out of the new life's blocks
    meant_for_old = old.allocate("r", list(range(4)), max_new_tokens=1)
    new._handles[meant_for_old.handle_id] = meant_for_old
    before = cache.k[0].clone()
    header = LayerHeader(meant_for_old.handle_id, 0, 0, 4, "float32", (4, 2, 4))
    new.on_layer(header, torch.full((4, 2, 4), 7.0), torch.zeros(4, 2, 4), 0)
    new.on_done(DoneHeader(meant_for_old.handle_id, 4, LAYOUT.num_layers, 0, 0))
    assert torch.equal(cache.k[0], before)
    assert meant_for_old.state == HandleState.ALLOCATED
    assert new.num_stale_frames == 2 and new.num_dropped_frames == 2


def test_an_unrenewed_lease_lapses_and_a_renewed_one_does_not():
    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    table = HandleTable(manager, cache, worker_id="d")
    abandoned = table.allocate("a", list(range(4)), max_new_tokens=1, lease_s=2.0)
    live = table.allocate("b", list(range(4)), max_new_tokens=1, lease_s=2.0)
    unleased = table.allocate("c", list(range(4)), max_new_tokens=1)
    start_s = live.lease_expires_s - 2.0
    assert table.lapsed(now_s=start_s + 1.9) == []
    renewed = [live.handle_id, unleased.handle_id, "d/unknown", "other/x"]
    assert table.renew(renewed, 2.0, now_s=start_s + 1.5) == 1
    assert table.lapsed(now_s=start_s + 2.0) == [abandoned.handle_id]
    assert table.lapsed(now_s=start_s + 3.6) == [abandoned.handle_id, live.handle_id]


def test_without_a_lease_handles_never_lapse(table_and_hooks):
    table, _ = table_and_hooks
    table.allocate("r", list(range(4)), max_new_tokens=1)
    assert table.lapsed(now_s=1e12) == []


def test_a_renewed_handle_keeps_waiting_for_its_kv_past_the_ready_timeout(table_and_hooks):
    """Under load a prefill may queue longer than the ready timeout; while the coordinator
    renews the handle it waits on, and only the lease frees it once abandoned."""
    table, _ = table_and_hooks  # ready timeout 5 s
    queued = table.allocate("q", list(range(4)), max_new_tokens=1, lease_s=2.0)
    start_s = queued.lease_expires_s - 2.0
    for t in range(1, 20):  # a heartbeat a second for 19 s
        table.renew([queued.handle_id], 2.0, now_s=start_s + t)
        assert table.expire(now_s=start_s + t + 0.5) == []
    assert table.lapsed(now_s=start_s + 19 + 2.0) == [queued.handle_id]
