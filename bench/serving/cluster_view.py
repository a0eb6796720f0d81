"""A disagg target's workers as its `/cluster` lists them, read by the benchmarks that
watch the server while they drive it (fault injection, the running-batch sampler)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

READ_TIMEOUT_S = 2.0


def read_cluster(url: str, timeout_s: float = READ_TIMEOUT_S) -> list[dict] | None:
    """The target's workers from /cluster; None when it cannot be read (not a disagg
    server, or not answering)."""
    try:
        with urllib.request.urlopen(f"{url}/cluster", timeout=timeout_s) as response:
            return json.load(response)["workers"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None
