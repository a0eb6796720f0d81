"""Hosts for a test: Linux network namespaces on one bridge, each with its own address.

    root namespace: bridge dg<tag>br (10.213.N.1/24, so the test can reach every host)
        ├── veth dg<tag>h0 ⇄ eth0 in namespace dg<tag>-0 (10.213.N.10)
        ├── veth dg<tag>h1 ⇄ eth0 in namespace dg<tag>-1 (10.213.N.11)
        └── ...

Every byte between two hosts crosses the bridge, so the host-side veth
counters say how much each host sent and received. `close` removes every
namespace, link and process it made, whatever state the test left them in.
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 30.0


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def must(*args: str) -> None:
    result = ip(*args)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def netns_refusal() -> str | None:
    """Why this machine will not let us make namespaces, or None when it will."""
    name = f"dgprobe{random.randrange(16**6):06x}"
    try:
        result = ip("netns", "add", name)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    ip("netns", "del", name)
    return None


@dataclass
class Host:
    namespace: str
    address: str
    host_veth: str
    """The veth end on the bridge: its tx is what the host received, its rx what it sent."""

    def counter(self, name: str) -> int:
        return int(Path(f"/sys/class/net/{self.host_veth}/statistics/{name}").read_text())

    @property
    def nbytes_sent(self) -> int:
        return self.counter("rx_bytes")

    @property
    def nbytes_received(self) -> int:
        return self.counter("tx_bytes")


@dataclass
class Network:
    """A bridge with `num_hosts` namespaces on it."""

    num_hosts: int
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    hosts: list[Host] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.subnet = f"10.213.{random.randrange(1, 255)}"
        self.bridge = f"dg{self.tag}br"

    def open(self) -> Network:
        must("link", "add", self.bridge, "type", "bridge")
        must("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        must("link", "set", self.bridge, "up")
        for i in range(self.num_hosts):
            self.hosts.append(self._add_host(i))
        return self

    def _add_host(self, i: int) -> Host:
        host = Host(f"dg{self.tag}-{i}", f"{self.subnet}.{10 + i}", f"dg{self.tag}h{i}")
        must("netns", "add", host.namespace)
        must("link", "add", host.host_veth, "type", "veth", "peer", "name", f"dg{self.tag}p{i}")
        must("link", "set", f"dg{self.tag}p{i}", "netns", host.namespace, "name", "eth0")
        must("link", "set", host.host_veth, "master", self.bridge, "up")
        inside = ("-n", host.namespace)
        must(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        must(*inside, "link", "set", "eth0", "up")
        must(*inside, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Unplug `host`: its bridge port goes down, so nothing reaches it or leaves it, and
        open connections neither close nor reset (a pulled cable, not a dead process)."""
        must("link", "set", host.host_veth, "down")

    def mend(self, host: Host) -> None:
        """Plug `host` back in."""
        must("link", "set", host.host_veth, "up")

    def spawn(self, host: Host, command: list[str], log_path: Path) -> subprocess.Popen:
        """Run `command` on `host` (in its namespace), output to `log_path`."""
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for host in self.hosts:
            # NOTE: deleting the namespace alone would free its veth pair only later,
            # asynchronously; deleting our end removes both ends now.
            ip("link", "del", host.host_veth)
            ip("netns", "del", host.namespace)
        ip("link", "del", self.bridge)

    def leftovers(self) -> list[str]:
        """Names of this network's namespaces and links that still exist."""
        names = ip("netns", "list").stdout + ip("-o", "link", "show").stdout
        return [word for word in names.split() if word.startswith(f"dg{self.tag}")]
