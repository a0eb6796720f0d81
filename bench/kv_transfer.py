"""KV transfer throughput: our data plane against raw ZeroMQ moving the same bytes.

Ours: `KVSender` -> `KVReceiver` -> a sink that writes every layer into a real
`PagedKVCache`, timed from the first send until the sink has seen the done
message and its checksum matched. Baseline: a raw PUSH->PULL pipe with the
same socket options carrying the same bytes in the same frames (a header-sized
frame, K, V per layer, then one final frame), zero-copy on both ends, with no
header parsing, checksum or cache write. Sender and receiver run in one
process: the sender in the main thread, the receiver in its own thread (plus
ZeroMQ's I/O thread on each side). Points alternate ours/raw and report the
median of the repeats. With `--mac`, a third pipe, ours with the cluster
secret's HMAC on every message (signed by the sender, verified by the
receiver), joins the alternation: its cost is signed against ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from bench.report import write_report
from disagg.kv.cache import KVLayout, PagedKVCache
from disagg.kv.frame_mac import FrameMac
from disagg.kv.transfer import KVReceiver, KVSender
from disagg.kv.wire import DTYPES, DoneHeader, LayerHeader, combine, frame_buffer

TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", default="1024,4096,16384", help="comma-separated prompt lengths"
    )
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--transports", default="tcp,ipc", help="comma-separated: tcp, ipc")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per point (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results")
    parser.add_argument(
        "--mac", action="store_true", help="also time ours with the HMAC of a cluster secret"
    )


@dataclass(frozen=True)
class Prompt:
    """One prompt's K/V as a prefill worker holds it: per layer k, v of [n, Hkv, D]."""

    num_tokens: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class PoolSink:
    """The decode side's work per message: copy into the pool, fold the checksum."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self._checksums: dict[str, int] = {}
        self._events: dict[str, threading.Event] = {}
        self.matched: dict[str, bool] = {}

    def expect(self, handle_id: str) -> threading.Event:
        self._checksums[handle_id] = 0
        self._events[handle_id] = threading.Event()
        return self._events[handle_id]

    def on_layer(
        self, header: LayerHeader, k: torch.Tensor, v: torch.Tensor, checksum: int
    ) -> None:
        # NOTE: the handle's blocks are 0..n-1, so its slots are one run and the write is
        # a plain copy into a view of the pool: the path a decode worker takes for
        # consecutive block ids. np.copyto, not Tensor.copy_: torch spreads a large copy
        # over its OpenMP threads, which fight ZeroMQ's I/O threads for the cores (on 2
        # busy cores: 1.6 GB/s against 10 GB/s single-threaded).
        _, _, num_heads, head_dim = self.cache.k[header.layer].shape
        rows = slice(header.start, header.end)
        pool_k = self.cache.k[header.layer].view(-1, num_heads, head_dim)[rows]
        pool_v = self.cache.v[header.layer].view(-1, num_heads, head_dim)[rows]
        np.copyto(frame_buffer(pool_k), frame_buffer(k))
        np.copyto(frame_buffer(pool_v), frame_buffer(v))
        self._checksums[header.handle_id] = combine(self._checksums[header.handle_id], checksum)

    def on_done(self, header: DoneHeader) -> None:
        self.matched[header.handle_id] = header.checksum == self._checksums[header.handle_id]
        self._events[header.handle_id].set()


class OursPipe:
    """KVSender -> KVReceiver -> PoolSink (with `mac`: every message signed and verified)."""

    def __init__(self, bind: str, cache: PagedKVCache, mac: FrameMac | None = None) -> None:
        self.sink = PoolSink(cache)
        self.receiver = KVReceiver(bind, self.sink, mac=mac).start()
        self.sender = KVSender(send_timeout_s=TIMEOUT_S, mac=mac)
        self._count = 0

    def transfer_s(self, prompt: Prompt) -> float:
        self._count += 1
        handle_id = f"bench-{self._count}"
        endpoint = self.receiver.endpoint
        done = self.sink.expect(handle_id)
        start = time.perf_counter()
        for layer, (k, v) in enumerate(prompt.layers):
            self.sender.send_layer(endpoint, handle_id, layer, 0, k, v)
        self.sender.finish(endpoint, handle_id, prompt.num_tokens, len(prompt.layers))
        if not done.wait(TIMEOUT_S) or not self.sink.matched[handle_id]:
            raise RuntimeError(f"{handle_id}: no done message or checksum mismatch")
        return time.perf_counter() - start

    def close(self) -> None:
        self.sender.close()
        self.receiver.stop()


class RawPipe:
    """The baseline: PUSH->PULL with the same frames, nothing done with them on arrival."""

    def __init__(self, bind: str) -> None:
        # NOTE: one context per side, as in ours (and as between two processes): one
        # shared context would serve both ends from one I/O thread, a setup no cluster has.
        self._contexts = (zmq.Context(), zmq.Context())
        self._pull = self._contexts[0].socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 4096)
        self._pull.bind(bind.replace(":0", ":*") if bind.startswith("tcp") else bind)
        endpoint = self._pull.getsockopt_string(zmq.LAST_ENDPOINT).replace("0.0.0.0", "127.0.0.1")
        self._push = self._contexts[1].socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 4096)
        self._push.connect(endpoint)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raw-pull", daemon=True)
        self._thread.start()

    def transfer_s(self, prompt: Prompt) -> float:
        header = b"h" * 150  # about our header's size
        self._done.clear()
        start = time.perf_counter()
        for k, v in prompt.layers:
            self._push.send_multipart([header, frame_buffer(k), frame_buffer(v)], copy=False)
        self._push.send(b"done")
        if not self._done.wait(TIMEOUT_S):
            raise RuntimeError("raw pipe: the final frame never arrived")
        return time.perf_counter() - start

    def close(self) -> None:
        self._push.send(b"stop")
        self._thread.join()
        self._push.close(linger=0)
        self._pull.close(linger=0)
        for context in self._contexts:
            context.term()

    def _drain(self) -> None:
        while True:
            frames = self._pull.recv_multipart(copy=False)
            if len(frames) == 1 and frames[0].bytes == b"stop":
                return
            if len(frames) == 1:
                self._done.set()


def make_prompt(args: argparse.Namespace, num_tokens: int) -> Prompt:
    generator = torch.Generator().manual_seed(args.seed + num_tokens)
    shape = (num_tokens, args.num_kv_heads, args.head_dim)
    dtype = DTYPES[args.dtype]

    def random_kv() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dtype)

    return Prompt(num_tokens, [(random_kv(), random_kv()) for _ in range(args.num_layers)])


def bind_address(transport: str, directory: str) -> str:
    return "tcp://0.0.0.0:0" if transport == "tcp" else f"ipc://{directory}/kv-{os.getpid()}.sock"


def measure_point(
    ours: OursPipe, raw: RawPipe, prompt: Prompt, repeats: int, signed: OursPipe | None = None
) -> dict:
    pipes = {"ours": ours, "raw": raw} | ({"signed": signed} if signed else {})
    for pipe in pipes.values():  # warm-up: connections, allocator
        pipe.transfer_s(prompt)
    times_s: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(repeats):  # NOTE: alternated, so background load hits all alike
        for name, pipe in pipes.items():
            times_s[name].append(pipe.transfer_s(prompt))
    ours_s, raw_s = times_s["ours"], times_s["raw"]
    ours_gbps = prompt.nbytes / statistics.median(ours_s) / 1e9
    raw_gbps = prompt.nbytes / statistics.median(raw_s) / 1e9
    mac = {}
    if signed:
        signed_s = statistics.median(times_s["signed"])
        mac = {
            "signed_s": times_s["signed"],
            "signed_gbps": prompt.nbytes / signed_s / 1e9,
            "mac_ms_per_mb": (signed_s - statistics.median(ours_s)) * 1e3 / (prompt.nbytes / 1e6),
        }
    return mac | {
        "num_tokens": prompt.num_tokens,
        "nbytes": prompt.nbytes,
        "ours_s": ours_s,
        "raw_s": raw_s,
        "ours_gbps": ours_gbps,
        "raw_gbps": raw_gbps,
        "ratio": ours_gbps / raw_gbps,
    }


def bench_transport(args: argparse.Namespace, transport: str, prompts: list[Prompt]) -> list[dict]:
    layout = KVLayout(args.num_layers, args.num_kv_heads, args.head_dim, args.block_size,
                      DTYPES[args.dtype])  # fmt: skip
    max_tokens = max(prompt.num_tokens for prompt in prompts)
    cache = PagedKVCache(layout, -(-max_tokens // args.block_size), torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as directory:
        bind = bind_address(transport, directory)
        ours = OursPipe(bind, cache)
        raw = RawPipe(bind.replace(".sock", "-raw.sock"))
        mac = FrameMac("bench-cluster-secret") if args.mac else None
        signed = OursPipe(bind.replace(".sock", "-signed.sock"), cache, mac) if mac else None
        try:
            return [measure_point(ours, raw, prompt, args.repeats, signed)
                    | {"transport": transport} for prompt in prompts]  # fmt: skip
        finally:
            for pipe in (ours, raw, signed):
                if pipe is not None:
                    pipe.close()


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n== KV transfer: {args.num_layers} layers x {args.num_kv_heads} kv heads x "
        f"{args.head_dim} head_dim, {args.dtype}; median of {args.repeats} =="
    )
    print(f"one process, {os.cpu_count()} cores: sender in the main thread, receiver in its "
          "own thread; raw = ZeroMQ PUSH->PULL, same frames, nothing done with them")  # fmt: skip
    print(f"{'transport':<10}{'tokens':>8}{'MB':>9}{'ours GB/s':>11}{'raw GB/s':>10}{'ratio':>8}")
    for r in results:
        print(f"{r['transport']:<10}{r['num_tokens']:>8}{r['nbytes'] / 1e6:>9.1f}"
              f"{r['ours_gbps']:>11.2f}{r['raw_gbps']:>10.2f}{r['ratio']:>7.0%}")  # fmt: skip
    print("target: ours >= 70% of raw")
    for r in results:
        if "signed_gbps" in r:
            print(f"with MAC: {r['transport']:<5}{r['num_tokens']:>7} tokens "
                  f"{r['signed_gbps']:>6.2f} GB/s against {r['ours_gbps']:.2f} without: "
                  f"+{r['mac_ms_per_mb']:.2f} ms per MB")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    prompts = [make_prompt(args, int(n)) for n in args.tokens.split(",")]
    results = []
    for transport in args.transports.split(","):
        results.extend(bench_transport(args, transport, prompts))
    print_table(results, args)
    write_report(args, "kv_transfer", results, same_process=True)
    return 0
