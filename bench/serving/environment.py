"""Where a run happened, so a number can be traced back to code and machine."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_sha(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the checkout the benchmark runs from, with `-dirty` when it has local edits."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if sha and dirty else sha or None


def environment() -> dict:
    return {
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "httpx": httpx.__version__,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
