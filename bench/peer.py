"""`transformers serve --continuous-batching`: the peer a user would otherwise run on a CPU box.

It serves the very directory our loader serves (the default GGUF converted once
to safetensors), in the same dtype, with torch's threads set to the machine's
cores as ours are. Its OpenAI dialect differs in ways the benchmark has to meet:

- it rejects `ignore_eos` (HTTP 422); `generation_config` with `eos_token_id: -1`
  is its way to generate exactly `max_tokens`;
- it only answers for the model path it was started with, and `/v1/models`
  does not list it, so requests name the path;
- it ends a stream at its finish chunk, without `data: [DONE]` (the client
  accepts that and counts it under `missing_done`);
- without a cap its paged cache takes 90% of free RAM, so the cache is sized
  for the benchmark's 16 streams of up to 640 tokens;
- on SIGTERM its batching thread can outlive the HTTP server, so the process is
  killed if it has not exited in a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

from bench.local_cluster import ServerProcess, free_port
from disagg.model.loader import hf_model_dir

CACHE_BLOCKS = 64
MAX_BATCH_TOKENS = 1024


def transformers_cli() -> Path:
    """The `transformers` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "transformers"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: pip install 'transformers[serving]'")
    return script


class TransformersServe(ServerProcess):
    """`with TransformersServe("default", "float32") as peer: peer.url, peer.extra_body`"""

    what = "transformers serve"
    stop_grace_s = 10.0

    def __init__(self, model: str, dtype: str, threads: int | None = None) -> None:
        super().__init__()
        self.model_dir = str(hf_model_dir(model)[0])
        self.dtype = dtype
        self.threads = threads or os.cpu_count() or 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._hub_cache = ""

    @property
    def extra_body(self) -> dict:
        return {
            "model": self.model_dir,
            "ignore_eos": None,
            "stream_options": None,
            "generation_config": json.dumps({"eos_token_id": -1}),
        }

    def command(self) -> list[str]:
        return [
            str(transformers_cli()), "serve", "--continuous-batching",
            "--device", "cpu", "--dtype", self.dtype,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--cb-num-blocks", str(CACHE_BLOCKS), "--cb-max-batch-tokens", str(MAX_BATCH_TOKENS),
            self.model_dir,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        # NOTE: an empty hub cache keeps /v1/models from failing on a missing one.
        self._hub_cache = tempfile.mkdtemp(prefix="disagg-peer-hub-")
        return super().env() | {
            "HF_HUB_CACHE": self._hub_cache,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(self.threads),
        }

    def is_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._hub_cache, ignore_errors=True)
