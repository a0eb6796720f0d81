"""Moving KV frames: a ZeroMQ sender on the prefill side, a receiver thread on the decode side.

The frame layout and checksum live in `kv_wire`; this module only owns
sockets, threads and the per-handle bookkeeping that makes zero-copy safe.

Sender: one PUSH socket per decode-worker endpoint, K/V frames sent straight
from tensor memory. ZeroMQ reads that memory later, from its I/O thread, so
`seal` sends the done message behind the layers and returns a `PendingSend`
whose trackers say when the caller may overwrite the tensors (`finish` waits
for that in place). The prefill worker watches pending sends off its compute
thread, so a receiver that stops reading stalls only its own handles.

The transport stays in the core, both ends together: the prefill worker uses
the sender, the decode worker the receiver, and the transfer benchmark both.

Receiver: one PULL socket bound on the decode worker and a daemon thread that
decodes each message into tensors viewing the received frames, checksums them
and hands them to a `KVSink` (the decode worker writes them into its paged
pool and moves the handle through its lifecycle). Bad input is counted and
dropped: a broken or hostile sender must not take the receiver down.

With a cluster secret both ends hold a `FrameMac`: the sender signs every
message, and the receiver drops (and counts in `num_rejected`) any message
whose tag does not verify, before its header is even parsed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import zmq

from disagg.kv.frame_mac import FrameMac
from disagg.kv.wire import (
    DoneHeader,
    LayerHeader,
    LayerMessage,
    combine,
    decode_message,
    dtype_name,
    frame_checksum,
    layer_frames,
)

logger = logging.getLogger(__name__)


class KVSink(Protocol):
    """Where the receiver thread delivers messages; called from that thread, one at a time."""

    def on_layer(
        self, header: LayerHeader, k: torch.Tensor, v: torch.Tensor, checksum: int
    ) -> None:
        """k, v: [n, Hkv, D] views of the received frames: copy them out, do not keep them."""

    def on_done(self, header: DoneHeader) -> None:
        """Every layer message of the handle was delivered before this (one pipe keeps order)."""


@dataclass
class _HandleSends:
    """What the sender has put on the wire for one handle, until `finish` or `abort`."""

    endpoint: str
    checksum: int = 0
    nbytes: int = 0
    layer_ids: set[int] = field(default_factory=set)
    trackers: list[zmq.MessageTracker] = field(default_factory=list)


@dataclass
class PendingSend:
    """A sealed handle whose frames ZeroMQ may still be reading from tensor memory."""

    done: DoneHeader
    trackers: list[zmq.MessageTracker]
    deadline_s: float
    """time.monotonic() after which the frames count as stuck (a receiver not draining)."""
    timeout_s: float

    @property
    def is_sent(self) -> bool:
        """Every frame has left the process: its tensors may be reused. Thread-safe."""
        return all(tracker.done for tracker in self.trackers)

    @property
    def is_overdue(self) -> bool:
        return not self.is_sent and time.monotonic() >= self.deadline_s

    def wait(self) -> None:
        """Block until sent; TimeoutError past the deadline."""
        _wait_all(self.trackers, max(0.0, self.deadline_s - time.monotonic()), self.timeout_s)


class KVSender:
    """Sends handles' K/V layer by layer to decode workers. One thread only, like its sockets."""

    def __init__(
        self,
        *,
        send_hwm: int = 4096,
        send_timeout_s: float = 30.0,
        linger_s: float = 1.0,
        mac: FrameMac | None = None,
    ) -> None:
        """send_hwm: messages queued per endpoint before `send_layer` blocks (each holds its
        tensors' memory, not a copy); send_timeout_s: how long a blocked send or `finish`
        waits for a slow or missing receiver before TimeoutError; linger_s: how long
        `close` lets unsent frames drain; mac: signs every message (the cluster's key)."""
        self._mac = mac
        self._context = zmq.Context()
        self._send_hwm = send_hwm
        self._send_timeout_s = send_timeout_s
        self._linger_s = linger_s
        self._sockets: dict[str, zmq.Socket] = {}
        self._handles: dict[str, _HandleSends] = {}

    def send_layer(
        self,
        endpoint: str,
        handle_id: str,
        layer: int,
        start: int,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Queue K/V of token positions [start, start + n) of one layer. k, v: [n, Hkv, D].

        NOTE: frames are sent zero-copy from the tensors' memory. A tensor that is
        not contiguous or not on the CPU is first copied into one that is (for a
        GPU tensor that is a synchronous device-to-host copy).
        """
        if k.shape != v.shape or k.dim() != 3 or k.dtype != v.dtype:
            raise ValueError(f"k, v must be [n, Hkv, D] of one dtype: {k.shape}, {v.shape}")
        k, v = _wire_ready(k), _wire_ready(v)
        end = start + k.shape[0]
        header = LayerHeader(handle_id, layer, start, end, dtype_name(k.dtype), k.shape)
        state = self._state(endpoint, handle_id)
        frames = layer_frames(header, k, v)
        checksum = frame_checksum(layer, start, frames[1], frames[2])
        state.trackers.extend(self._send(self._socket(endpoint), self._signed(frames)))
        state.checksum = combine(state.checksum, checksum)
        state.nbytes += frames[1].nbytes + frames[2].nbytes
        state.layer_ids.add(layer)

    def finish(self, endpoint: str, handle_id: str, num_tokens: int, num_layers: int) -> DoneHeader:
        """`seal` the handle and wait until every frame has left the process.

        Returns the done message sent (the handle's K/V bytes and checksum). Once
        this returns, the tensors given to `send_layer` may be reused. Raises like
        `seal`, and TimeoutError when the frames did not leave in time.
        """
        pending = self.seal(endpoint, handle_id, num_tokens, num_layers)
        pending.wait()
        return pending.done

    def seal(self, endpoint: str, handle_id: str, num_tokens: int, num_layers: int) -> PendingSend:
        """Send the handle's done message now, behind its layers; do not wait for them.

        The done message follows the layers down the same pipe, so the receiver sees
        it last whatever happens; only the memory of the frames is still in ZeroMQ's
        hands. The returned `PendingSend` says when the tensors may be reused, and can
        be watched from another thread, so a slow receiver stalls no one else's sends.
        Raises ValueError when some layer in [0, num_layers) was never sent (no done
        goes out: the decode worker will fail the handle); either way the handle is
        forgotten.
        """
        state = self._pop(endpoint, handle_id)
        missing = sorted(set(range(num_layers)) - state.layer_ids)
        if missing:
            raise ValueError(f"handle {handle_id}: layers {missing} were never sent")
        done = DoneHeader(handle_id, num_tokens, num_layers, state.checksum, state.nbytes)
        trackers = state.trackers + self._send(
            self._socket(endpoint), self._signed([done.encode()])
        )
        deadline_s = time.monotonic() + self._send_timeout_s
        return PendingSend(done, trackers, deadline_s, self._send_timeout_s)

    def abort(self, handle_id: str) -> None:
        """Forget a handle without sending done; the decode worker fails it on its own.

        NOTE: frames already queued still go out (ZeroMQ cannot take them back) and
        keep their tensors alive until then. The caller may reuse the memory right
        away: no done message follows, so those bytes can never make the handle READY,
        and handle ids are never reused, so they cannot land in another handle.
        """
        self._handles.pop(handle_id, None)

    def close(self) -> None:
        """Close every socket; frames not sent within linger_s are dropped."""
        for socket in self._sockets.values():
            socket.close(linger=int(self._linger_s * 1000))
        self._sockets.clear()
        self._handles.clear()
        self._context.term()

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _signed(self, frames: list) -> list:
        return frames if self._mac is None else self._mac.signed(frames)

    def _state(self, endpoint: str, handle_id: str) -> _HandleSends:
        state = self._handles.setdefault(handle_id, _HandleSends(endpoint))
        if state.endpoint != endpoint:
            raise ValueError(f"handle {handle_id} goes to {state.endpoint}, not {endpoint}")
        return state

    def _pop(self, endpoint: str, handle_id: str) -> _HandleSends:
        state = self._handles.pop(handle_id, None)
        if state is None or state.endpoint != endpoint:
            raise ValueError(f"handle {handle_id}: nothing was sent to {endpoint}")
        return state

    def _socket(self, endpoint: str) -> zmq.Socket:
        socket = self._sockets.get(endpoint)
        if socket is None:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, self._send_hwm)
            socket.setsockopt(zmq.SNDTIMEO, int(self._send_timeout_s * 1000))
            socket.setsockopt(zmq.LINGER, int(self._linger_s * 1000))
            socket.connect(endpoint)
            self._sockets[endpoint] = socket
        return socket

    @staticmethod
    def _send(socket: zmq.Socket, frames: list) -> list[zmq.MessageTracker]:
        """Send one multipart message; trackers of the frames ZeroMQ did not copy."""
        trackers = []
        try:
            for index, frame in enumerate(frames):
                flags = zmq.SNDMORE if index < len(frames) - 1 else 0
                tracker = socket.send(frame, flags, copy=False, track=True)
                if not tracker.done:  # small frames are copied, their tracker is done
                    trackers.append(tracker)
        except zmq.Again:
            raise TimeoutError(
                f"send queue full: no receiver is draining {_name(socket)}"
            ) from None
        return trackers


class KVReceiver:
    """Binds a PULL socket and delivers every arriving message to a sink from its own thread."""

    def __init__(
        self,
        bind: str,
        sink: KVSink,
        *,
        advertise_host: str = "127.0.0.1",
        recv_hwm: int = 4096,
        poll_interval_s: float = 0.05,
        mac: FrameMac | None = None,
    ) -> None:
        """bind: `tcp://0.0.0.0:0` (port 0: any free port) or `ipc:///path`;
        advertise_host: the host senders should connect to, for tcp;
        poll_interval_s: how quickly the thread notices `stop`;
        mac: when given, only messages it verifies reach the sink."""
        self.sink = sink
        self._mac = mac
        self.num_rejected = 0
        """Messages dropped because their MAC was missing or wrong (forged or altered)."""
        self.num_malformed = 0
        self.num_sink_errors = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, recv_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVTIMEO, int(poll_interval_s * 1000))
        self._socket.bind(_bindable(bind))
        self._bound = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._advertise_host = advertise_host
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kv-receiver {self.endpoint}", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """Where senders connect: advertised host and bound port, or the ipc path."""
        if not self._bound.startswith("tcp://"):
            return self._bound
        port = self._bound.rsplit(":", 1)[1]
        host = self._advertise_host
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> KVReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Join the thread, close the socket and (for ipc) remove the socket file."""
        if self._socket.closed:
            return
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close(linger=0)
        self._context.term()
        if self._bound.startswith("ipc://"):  # libzmq unlinks on close; make sure
            path = self._bound.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> KVReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:  # NOTE: a blocking recv with RCVTIMEO, not poll + recv: one syscall less
                frames = self._socket.recv_multipart(copy=False)
            except zmq.Again:  # RCVTIMEO passed: look at the stop flag
                continue
            self._deliver([frame.buffer for frame in frames])

    def _deliver(self, frames: list[memoryview]) -> None:
        if self._mac is not None:
            frames = self._mac.verified(frames)
            if frames is None:
                self._reject()
                return
        try:
            message = decode_message(frames)
        except ValueError as exc:
            self.num_malformed += 1
            logger.warning("dropped a malformed KV message: %s", exc)
            return
        try:
            if isinstance(message, LayerMessage):
                header = message.header
                checksum = frame_checksum(header.layer, header.start, frames[1], frames[2])
                self.sink.on_layer(header, message.k, message.v, checksum)
            else:
                self.sink.on_done(message)
        except Exception:
            self.num_sink_errors += 1
            logger.exception("KV sink failed on a message; the receiver goes on")

    def _reject(self) -> None:
        self.num_rejected += 1
        if self.num_rejected & (self.num_rejected - 1) == 0:  # 1, 2, 4, ...: no log flood
            logger.warning(
                "dropped a KV message whose MAC did not verify (%d so far): a sender "
                "without the cluster secret, or altered bytes",
                self.num_rejected,
            )


def _wire_ready(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (the same tensor when it already is one)."""
    if tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad:
        return tensor
    return tensor.detach().to("cpu").contiguous()


def _wait_all(trackers: list[zmq.MessageTracker], timeout_s: float, limit_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for tracker in trackers:
        try:
            tracker.wait(max(0.0, deadline - time.monotonic()))
        except zmq.NotDone:
            raise TimeoutError(f"KV frames still queued after {limit_s}s") from None


def _bindable(address: str) -> str:
    """ZeroMQ spells 'any free port' as `*`; accept the familiar port 0 too."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[: -len(":0")] + ":*"
    return address


def _name(socket: zmq.Socket) -> str:
    return socket.getsockopt_string(zmq.LAST_ENDPOINT) or "its endpoint"
