"""A whole cluster in one process: coordinator, prefill worker and decode worker on one event
loop in a background thread, on a tiny random-weight model, KV over ZeroMQ ipc in a temp dir.

It drives the real OpenAI, KServe REST and KServe gRPC front doors and the real control plane
in seconds, where `disagg serve` starts 3 processes that each load the model. Each role runs
its own `main.run`, unchanged: the loop records the SIGTERM/SIGINT handlers they install, and
stopping the cluster calls them, which is what a signal would do. Every listener takes a free
port (workers bind port 0 themselves).

It mirrors `tests.cluster_harness.ServeProcess` (`url`, `http_port`, `grpc_port`,
`cluster()`, `completion()`, `wait_all_blocks_free()`), so a test can run on either.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from unittest import mock

from disagg.config import WorkerConfig
from tests.cluster_harness import port_is_free, post_json, wait_until

TINY_MODEL_NAME = "tiny-smollm2"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def build_tiny_model_dir(root: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with the default model's tokenizer, saved as an HF directory.

    The real tokenizer keeps text, chat templates and stop strings realistic; the random
    weights make every forward cost microseconds. Greedy output is still checked against
    transformers' own generate on the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from disagg.model.loader import hf_model_dir

    default_dir, _, default_config = hf_model_dir("default")
    model_dir = root / TINY_MODEL_NAME
    config = LlamaConfig(
        vocab_size=default_config.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=default_config.bos_token_id,
        eos_token_id=default_config.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (default_dir / name).exists():
            shutil.copy(default_dir / name, model_dir / name)
    return model_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _RecordingLoop(asyncio.SelectorEventLoop):
    """An event loop that keeps signal handlers instead of installing them (it runs off the
    main thread, where signals cannot be set); `stop_roles` calls them, as a SIGTERM would."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_handlers: list[tuple[Callable, tuple]] = []

    def add_signal_handler(self, sig: int, callback: Callable, *args: object) -> None:
        self.stop_handlers.append((callback, args))

    def stop_roles(self) -> None:
        for callback, args in self.stop_handlers:
            callback(*args)


def _add_kserve_grpc(server: object, frontend: object, api_keys: object = None) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from coordinator.kserve_grpc import KServeServicer

    # tritonclient's service has methods disagg does not serve: its base answers UNIMPLEMENTED
    servicer_class = type(
        "Servicer", (KServeServicer, service_pb2_grpc.GRPCInferenceServiceServicer), {}
    )
    servicer = servicer_class(frontend, service_pb2, api_keys)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


class InProcessCluster:
    def __init__(
        self,
        model_dir: Path,
        num_kv_blocks: int = 1024,
        block_size: int = 16,
        queue_timeout_s: float = 30.0,
        heartbeat_interval_s: float = 1.0,
        max_num_batched_tokens: int = 2048,
        dispatch: dict | None = None,
        decode: dict | None = None,
        **coordinator_options: object,
    ) -> None:
        """dispatch: DispatchConfig fields (placement policy, timeouts); decode: the decode
        worker's DecodeWorkerConfig fields."""
        self.model_dir = model_dir
        self.model = TINY_MODEL_NAME
        self.http_port, self.grpc_port, self.control_port = free_port(), free_port(), free_port()
        tls_cert = coordinator_options.get("tls_cert")
        self.url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{self.http_port}"
        self.ssl_context = ssl.create_default_context(cafile=tls_cert) if tls_cert else None
        """With TLS (`tls_cert=` a self-signed certificate): a client context that trusts it."""
        self._engine = dict(
            model=str(model_dir),
            dtype="float32",
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        self._coordinator = dict(
            model=str(model_dir),
            host="127.0.0.1",
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            control_port=self.control_port,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=max(3.0, 3 * heartbeat_interval_s),
            queue_timeout_s=queue_timeout_s,
            **coordinator_options,
        )
        # NOTE: tests of the disaggregated path want every prompt on a prefill worker;
        # the ones about placement ask for auto.
        self._dispatch = {"disagg_policy": "always", **(dispatch or {})}
        self._decode = {"kv_transport": "ipc"} | (decode or {})
        self._loop = _RecordingLoop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cluster", daemon=True)
        self._roles: asyncio.Future | None = None

    def _roles_to_run(self) -> list[Coroutine]:
        from coordinator import main as coordinator_main
        from decode_worker import main as decode_main
        from disagg.config import (
            CoordinatorConfig,
            DecodeWorkerConfig,
            DispatchConfig,
            EngineConfig,
        )
        from prefill_worker import main as prefill_main

        engine = EngineConfig(**self._engine)
        return [
            coordinator_main.run(
                CoordinatorConfig(**self._coordinator), DispatchConfig(**self._dispatch)
            ),
            prefill_main.run(engine, self.worker_config("prefill-0")),
            decode_main.run(
                engine, self.worker_config("decode-0"), DecodeWorkerConfig(**self._decode)
            ),
        ]

    def worker_config(self, worker_id: str) -> WorkerConfig:
        """A worker of this cluster: its coordinator, loopback, one thread, its secret."""
        return WorkerConfig(
            worker_id=worker_id,
            coordinator=f"127.0.0.1:{self.control_port}",
            host="127.0.0.1",
            threads=1,
            cluster_secret=self._coordinator.get("cluster_secret", ""),
        )

    def __enter__(self) -> InProcessCluster:
        from coordinator import kserve_grpc

        self._thread.start()

        async def run_all() -> None:
            await asyncio.gather(*self._roles_to_run())

        # NOTE: tests drive gRPC with tritonclient, whose generated messages share package
        # `inference` with disagg's; protobuf takes only one per process, so the servicer
        # gets tritonclient's (the same wire format; see coordinator.kserve_grpc).
        with mock.patch.object(kserve_grpc, "add_to_server", _add_kserve_grpc):
            self._roles = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
            try:
                wait_until(self._is_ready, 120, "the in-process cluster to be ready")
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop_roles)
        try:
            self._roles.result(timeout=30)  # a role that failed raises here
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        assert port_is_free(self.http_port) and port_is_free(self.control_port)

    def _is_ready(self) -> bool:
        if self._roles is not None and self._roles.done():
            self._roles.result()  # a role that died while starting: its error, now
        try:
            return self.cluster()["ready"]
        except OSError:
            return False

    def cluster(self) -> dict:
        url = f"{self.url}/cluster"
        with urllib.request.urlopen(url, timeout=10, context=self.ssl_context) as response:
            return json.load(response)

    def completion(self, prompt: str | list[int], **fields: object) -> tuple[int, dict]:
        return post_json(f"{self.url}/v1/completions", {"prompt": prompt, **fields})

    def wait_all_blocks_free(self, timeout_s: float = 30.0) -> None:
        def all_free() -> bool:
            workers = self.cluster()["workers"]
            return all(
                w["free_kv_blocks"] == w["total_kv_blocks"] and w["load"] == 0 for w in workers
            )

        wait_until(all_free, timeout_s, "every KV block to be free")
