"""The KV data plane over real ZeroMQ sockets (tcp loopback and ipc) into a real paged pool."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import zmq

from disagg.kv.cache import KVLayout, PagedKVCache
from disagg.kv.transfer import KVReceiver, KVSender
from disagg.kv.wire import DoneHeader, LayerHeader, combine

DEADLINE_S = 10.0


def wait_until(predicate: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    """Poll with a deadline: threads and sockets make progress on their own time."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        pause.wait(0.005)


class CacheSink:
    """Writes arriving K/V into a paged pool at each handle's slots and folds checksums."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.block_tables: dict[str, list[int]] = {}
        self.checksums: dict[str, int] = {}
        self.done: dict[str, DoneHeader] = {}
        self.done_events: dict[str, threading.Event] = {}

    def expect(self, handle_id: str, block_table: list[int]) -> threading.Event:
        self.block_tables[handle_id] = block_table
        self.checksums[handle_id] = 0
        self.done_events[handle_id] = threading.Event()
        return self.done_events[handle_id]

    def on_layer(
        self, header: LayerHeader, k: torch.Tensor, v: torch.Tensor, checksum: int
    ) -> None:
        table = self.block_tables[header.handle_id]
        slots = torch.tensor(self.cache.slot_ids(table, header.start, header.end))
        self.cache.write(header.layer, slots, k, v)
        self.checksums[header.handle_id] = combine(self.checksums[header.handle_id], checksum)

    def on_done(self, header: DoneHeader) -> None:
        self.done[header.handle_id] = header
        self.done_events[header.handle_id].set()


def make_cache(dtype: torch.dtype) -> PagedKVCache:
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)
    return PagedKVCache(layout, num_blocks=16, device=torch.device("cpu"))


def bind_address(transport: str, tmp_path: Path) -> str:
    return "tcp://0.0.0.0:0" if transport == "tcp" else f"ipc://{tmp_path}/kv.sock"


@pytest.fixture(params=["tcp", "ipc"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def sender() -> Iterator[KVSender]:
    with KVSender(send_timeout_s=DEADLINE_S) as sender:
        yield sender


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_interleaved_handles_land_in_the_cache(
    transport: str, dtype: torch.dtype, tmp_path: Path, sender: KVSender
):
    cache = make_cache(dtype)
    sink = CacheSink(cache)
    # a: 10 tokens in scattered blocks, sent in two chunks per layer; b: 7 tokens, one chunk
    handles = {"a": ([5, 2, 9], [(0, 6), (6, 10)]), "b": ([0, 1], [(0, 7)])}
    events = {hid: sink.expect(hid, table) for hid, (table, _) in handles.items()}
    sent = {}
    with KVReceiver(bind_address(transport, tmp_path), sink) as receiver:
        for layer in range(3):
            for hid, (_, chunks) in handles.items():
                for start, end in chunks:
                    k = torch.randn(end - start, 2, 8).to(dtype)
                    v = torch.randn(end - start, 2, 8).to(dtype)
                    sender.send_layer(receiver.endpoint, hid, layer, start, k, v)
                    sent[hid, layer, start] = (k, v)
        sent_done = {hid: sender.finish(receiver.endpoint, hid, chunks[-1][1], 3)
                  for hid, (_, chunks) in handles.items()}  # fmt: skip
        for event in events.values():
            assert event.wait(DEADLINE_S)
    assert receiver.num_malformed == 0 and receiver.num_sink_errors == 0
    for hid, (table, chunks) in handles.items():
        num_tokens = chunks[-1][1]
        done = sink.done[hid]
        assert (done.num_tokens, done.num_layers) == (num_tokens, 3)
        assert done.checksum == sink.checksums[hid]
        assert done == sent_done[hid]
        assert done.nbytes == 3 * 2 * num_tokens * 2 * 8 * dtype.itemsize
        for (sent_hid, layer, start), (k, v) in sent.items():
            if sent_hid == hid:
                slots = torch.tensor(cache.slot_ids(table, start, start + k.shape[0]))
                assert all(map(torch.equal, cache.gather(layer, slots), (k, v)))


def test_finish_returns_once_the_tensors_may_be_reused(transport: str, tmp_path: Path):
    """Frames past ZeroMQ's copy threshold (64 KiB) go zero-copy from the tensors."""
    num_tokens, layout = 4096, KVLayout(2, 2, 8, block_size=16, dtype=torch.float32)
    cache = PagedKVCache(layout, num_blocks=num_tokens // 16, device=torch.device("cpu"))
    sink = CacheSink(cache)
    event = sink.expect("big", list(range(num_tokens // 16)))
    sources = [(torch.randn(num_tokens, 2, 8), torch.randn(num_tokens, 2, 8)) for _ in range(2)]
    copies = [(k.clone(), v.clone()) for k, v in sources]
    with KVReceiver(bind_address(transport, tmp_path), sink) as receiver, KVSender() as sender:
        for layer, (k, v) in enumerate(sources):
            sender.send_layer(receiver.endpoint, "big", layer, 0, k, v)
        assert sender.finish(receiver.endpoint, "big", num_tokens, 2).nbytes == 2 * 2 * k.nbytes
        for k, v in sources:  # what a prefill worker does with its buffers next
            k.fill_(float("nan")), v.fill_(float("nan"))
        assert event.wait(DEADLINE_S)
    assert sink.done["big"].checksum == sink.checksums["big"]
    for layer, (k, v) in enumerate(copies):
        assert torch.equal(cache.k[layer].view(-1, 2, 8), k)
        assert torch.equal(cache.v[layer].view(-1, 2, 8), v)


def test_non_contiguous_tensors_are_sent_by_value(tmp_path: Path, sender: KVSender):
    cache = make_cache(torch.float32)
    sink = CacheSink(cache)
    event = sink.expect("t", [3, 4])
    k = torch.randn(8, 2, 6).permute(2, 1, 0)[:, :, :]  # [6, 2, 8], not contiguous
    v = torch.randn(6, 8, 2).transpose(1, 2)  # [6, 2, 8], not contiguous
    assert not k.is_contiguous() and not v.is_contiguous()
    with KVReceiver(bind_address("ipc", tmp_path), sink) as receiver:
        for layer in range(3):
            sender.send_layer(receiver.endpoint, "t", layer, 0, k, v)
        sender.finish(receiver.endpoint, "t", 6, 3)
        assert event.wait(DEADLINE_S)
    slots = torch.tensor(cache.slot_ids([3, 4], 0, 6))
    assert all(map(torch.equal, cache.gather(2, slots), (k, v)))
    assert sink.done["t"].checksum == sink.checksums["t"]


def test_malformed_messages_are_counted_and_the_receiver_goes_on(
    transport: str, tmp_path: Path, sender: KVSender
):
    cache = make_cache(torch.float32)
    sink = CacheSink(cache)
    event = sink.expect("ok", [7])
    header = LayerHeader("x", 0, 0, 2, "float32", (2, 2, 8))
    good = b"\x00" * header.frame_nbytes
    garbage = [
        [b"\xde\xad\xbe\xef"],  # not a header
        [header.encode(), good],  # one frame short
        [header.encode(), good, good[:-1]],  # V one byte short
        [header.encode(), good, good, good],  # one frame too many
        [DoneHeader("x", 2, 1, 0, 0).encode(), good],  # done with a tensor frame
    ]
    with KVReceiver(bind_address(transport, tmp_path), sink) as receiver:
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(receiver.endpoint)
        for frames in garbage:
            raw.send_multipart(frames)
        wait_until(lambda: receiver.num_malformed == len(garbage))
        raw.close(linger=0)
        k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
        for layer in range(3):
            sender.send_layer(receiver.endpoint, "ok", layer, 0, k, v)
        sender.finish(receiver.endpoint, "ok", 3, 3)
        assert event.wait(DEADLINE_S)
        assert receiver.is_running
    assert receiver.num_malformed == len(garbage) and receiver.num_sink_errors == 0
    assert sink.done["ok"].checksum == sink.checksums["ok"]


def test_a_failing_sink_is_logged_and_the_receiver_goes_on(tmp_path: Path, sender: KVSender):
    sink = CacheSink(make_cache(torch.float32))
    event = sink.expect("known", [0])
    k = torch.randn(2, 2, 8)
    with KVReceiver(bind_address("ipc", tmp_path), sink) as receiver:
        sender.send_layer(receiver.endpoint, "unknown", 0, 0, k, k)  # KeyError in the sink
        sender.abort("unknown")
        for layer in range(3):
            sender.send_layer(receiver.endpoint, "known", layer, 0, k, k)
        sender.finish(receiver.endpoint, "known", 2, 3)
        assert event.wait(DEADLINE_S)
    assert receiver.num_sink_errors == 1 and receiver.num_malformed == 0


def test_stop_joins_the_thread_and_removes_the_ipc_file(tmp_path: Path):
    # NOTE: other receivers (a session-wide in-process cluster's) may be running: only threads
    # started by this test count.
    before = set(threading.enumerate())
    receiver = KVReceiver(f"ipc://{tmp_path}/kv.sock", CacheSink(make_cache(torch.float32)))
    assert receiver.endpoint == f"ipc://{tmp_path}/kv.sock"
    receiver.start()
    assert receiver.is_running and os.path.exists(tmp_path / "kv.sock")
    receiver.stop()
    assert not receiver.is_running and not os.path.exists(tmp_path / "kv.sock")
    started = set(threading.enumerate()) - before
    assert not any(t.name.startswith("kv-receiver") for t in started)
    receiver.stop()  # idempotent


def test_tcp_endpoint_advertises_the_host_and_the_bound_port():
    sink = CacheSink(make_cache(torch.float32))
    with KVReceiver("tcp://0.0.0.0:0", sink, advertise_host="10.1.2.3") as receiver:
        host_port = receiver.endpoint.removeprefix("tcp://")
        host, port = host_port.rsplit(":", 1)
        assert host == "10.1.2.3" and int(port) > 0


def test_finish_refuses_missing_layers_and_unknown_handles(tmp_path: Path, sender: KVSender):
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    k = torch.randn(2, 2, 8)
    sender.send_layer(endpoint, "h", 0, 0, k, k)
    with pytest.raises(ValueError, match="never sent"):
        sender.finish(endpoint, "h", 2, num_layers=2)
    with pytest.raises(ValueError, match="nothing was sent"):
        sender.finish(endpoint, "h", 2, num_layers=1)  # forgotten by the failed finish


def test_finish_times_out_when_no_receiver_drains_the_frames(tmp_path: Path):
    with KVSender(send_timeout_s=0.2, linger_s=0) as sender:
        endpoint = f"ipc://{tmp_path}/nobody.sock"
        k = torch.randn(4096, 2, 8)  # 256 KiB: zero-copy, so finish must wait for it
        sender.send_layer(endpoint, "h", 0, 0, k, k)
        with pytest.raises(TimeoutError):
            sender.finish(endpoint, "h", 4096, 1)
