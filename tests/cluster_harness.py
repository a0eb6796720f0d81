"""A real `disagg serve` for a test, which must leave no process and no listening port behind."""

from __future__ import annotations

import socket

from bench.local_cluster import LocalCluster, post_json, wait_until

__all__ = ["ServeProcess", "post_json", "wait_until"]


def port_is_free(port: int) -> bool:
    """Nothing listens there (connections left in TIME_WAIT do not count, as for any server)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


class ServeProcess(LocalCluster):
    def __init__(self, *args: str) -> None:
        super().__init__(*args, "--dtype", "float32", "--kv-cache-memory", str(256 << 20))
        self.worker_pids: dict[str, int] = {}

    def __enter__(self) -> ServeProcess:
        super().__enter__()
        for worker in self.cluster()["workers"]:
            self.worker_pids[worker["worker_id"]] = worker["pid"]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        assert self.process.returncode == 0, f"disagg serve exited with {self.process.returncode}"
        for worker_id, pid in self.worker_pids.items():
            assert not pid_alive(pid), f"{worker_id} (pid {pid}) outlived disagg serve"
        assert port_is_free(self.http_port) and port_is_free(self.control_port)

    def wait_all_blocks_free(self, timeout_s: float = 30.0) -> None:
        def all_free() -> bool:
            workers = self.cluster()["workers"]
            return all(
                w["free_kv_blocks"] == w["total_kv_blocks"] and w["load"] == 0 for w in workers
            )

        wait_until(all_free, timeout_s, "every KV block to be free")
