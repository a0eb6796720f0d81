"""A SIGKILLed decode worker leaves its ipc socket directory behind; the next one to start
removes it, and never a live worker's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from decode_worker.kv_socket_dir import make_socket_dir, remove_stale_socket_dirs


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_directories_of_dead_processes_are_removed(tmp_path: Path):
    mine = make_socket_dir(str(tmp_path))
    (mine / "kv.sock").touch()
    dead = tmp_path / f"disagg-kv-{dead_pid()}-abcd1234"
    dead.mkdir()
    (dead / "kv.sock").touch()
    unrelated = [tmp_path / "disagg-kv-legacy_1", tmp_path / "other-123-x"]
    for path in unrelated:
        path.mkdir()

    assert remove_stale_socket_dirs(str(tmp_path)) == [dead]
    assert not dead.exists()
    assert mine.exists() and mine.name.startswith(f"disagg-kv-{os.getpid()}-")
    assert all(path.exists() for path in unrelated)
