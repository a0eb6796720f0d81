from __future__ import annotations

import pytest

from bench.serving.commands import load_tokenizer
from bench.serving.loopback import LoopbackConfig, LoopbackServer

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_INTERVAL_S = 0.002


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer, loaded once (the CLI's cached loader, so `run` reuses it)."""
    return load_tokenizer("default")


@pytest.fixture(scope="session")
def loopback(tokenizer):
    """One SSE server with known timings that counts prompt tokens like the real server."""
    config = LoopbackConfig(
        FIRST_TOKEN_DELAY_S,
        TOKEN_INTERVAL_S,
        prompt_counter=lambda text: len(tokenizer(text)["input_ids"]),
    )
    with LoopbackServer(config) as server:
        yield server
