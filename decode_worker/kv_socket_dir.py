"""The directory of a decode worker's ZeroMQ ipc socket, and cleaning up after dead workers.

Each worker's socket lives in its own `disagg-kv-<pid>-<random>` directory under the
temp dir. A worker that exits cleanly removes its own; one that was SIGKILLed (or
crashed) cannot, so every decode worker, as it starts, removes the directories whose
owner pid is no longer alive. NOTE: a pid can be reused; a directory whose pid now
belongs to another process is only left for a later start-up to remove, never a live
worker's directory taken.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "disagg-kv-"
_NAME = re.compile(rf"^{PREFIX}(?P<pid>\d+)-")


def make_socket_dir(root: str | None = None) -> Path:
    """A fresh directory for this process's ipc socket, named by its pid."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_socket_dirs(root: str | None = None) -> list[Path]:
    """Remove socket directories of processes that no longer exist; returns them."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match is None or not path.is_dir() or is_alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d KV socket directories of dead workers", len(removed))
    return removed
