"""Every setting of every component, in one place: frozen dataclasses, one per component.

Each field has a default and a one-line docstring; `launcher/options.py` turns
the fields into command-line flags and `DISAGG_*` environment variables (the
default written once, here; the help text is the docstring). Each class checks
itself in `__post_init__` and names the offending field in the error.

Flag names come from field names: `max_num_seqs` -> `--max-num-seqs`, with a
leading `num_` and a unit suffix (`_s`, `_bytes`) dropped, so `num_kv_blocks`
is `--kv-blocks` and `ready_timeout_s` is `--ready-timeout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from disagg.errors import DisaggError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Transport = Literal["tcp", "ipc"]
Mode = Literal["disaggregated", "colocated"]
DisaggPolicy = Literal["always", "never", "auto"]
KVReservation = Literal["on-demand", "full"]


class ConfigError(DisaggError, ValueError):
    """A setting is out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def parse_tenant_weights(text: str) -> dict[str, float]:
    """`TENANT=WEIGHT,...` as tenant -> weight (finite, > 0); ConfigError otherwise."""
    weights: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        tenant, _, number = entry.partition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        require(
            bool(tenant.strip()) and math.isfinite(weight) and weight > 0,
            "tenant_weights",
            f"{entry!r} is not TENANT=WEIGHT with a weight > 0",
        )
        weights[tenant.strip()] = weight
    return weights


def require_port(port: int, field: str, allow_any: bool = False) -> None:
    low = 0 if allow_any else 1
    require(low <= port < 65536, field, f"must be in [{low}, 65535], got {port}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences in the running batch."""
    max_num_batched_tokens: int = 256
    """Most prompt tokens in one prefill step; longer prompts are chunked."""
    decode_interleave_tokens: int = 256
    """With sequences decoding: prompt tokens per prefill step, then a decode step (0: off)."""

    def __post_init__(self) -> None:
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        require(self.decode_interleave_tokens >= 0, "decode_interleave_tokens", "must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"
    """`default`, a .gguf file, or a local HF model directory."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: Dtype = "auto"
    """auto = bfloat16 where the hardware computes it natively, else float32."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_bytes: int = 1 << 30
    """Memory budget of the KV pool in bytes, used when num_kv_blocks is not given."""
    num_kv_blocks: int | None = None
    """Exact KV pool size in blocks; overrides the memory budget."""
    max_num_seqs: int = 256
    """Most sequences decoding together."""
    # NOTE: small steps stagger a burst's first tokens (prompts finish one or two at a
    # time, not all at the end of one long step); on a CPU core a 256-token step is
    # ~1 s and its fixed cost ~2%, so throughput holds (README, "prefill step budget").
    max_num_batched_tokens: int = 256
    """Most prompt tokens in one prefill forward; longer prompts are chunked."""
    # NOTE: keeps running streams at pace while prompts arrive (colocated, or in place)
    decode_interleave_tokens: int = 256
    """With sequences decoding: prompt tokens per prefill step, then a decode step (0: off)."""
    max_model_len: int | None = None
    """Context limit (prompt + output) in tokens; defaults to the model's."""
    compile: bool = False
    """torch.compile the decode step at start-up (needs a C++ compiler; minutes on small CPUs)."""
    no_prefix_caching: bool = False
    """Compute and ship every prompt whole instead of reusing cached KV of its leading blocks."""

    def __post_init__(self) -> None:
        require(self.block_size >= 1, "block_size", "must be >= 1")
        blocks = self.num_kv_blocks
        require(blocks is None or blocks >= 1, "num_kv_blocks", "must be >= 1")
        require(self.kv_cache_memory_bytes >= 1, "kv_cache_memory_bytes", "must be >= 1")
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1")
        self.scheduler  # noqa: B018 -- validates max_num_seqs and max_num_batched_tokens

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, self.decode_interleave_tokens
        )


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str = "127.0.0.1:50050"
    """host:port of the coordinator's control (registry) server."""
    host: str = "0.0.0.0"
    """Address the worker's gRPC server binds."""
    port: int = 0
    """gRPC port; 0 picks a free one, which is then advertised."""
    advertise_host: str = "127.0.0.1"
    """Host other machines use to reach this worker (gRPC and ZeroMQ)."""
    worker_id: str = ""
    """Unique name; defaults to role-hostname-pid."""
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    # NOTE: best given as DISAGG_CLUSTER_SECRET, off the command line (`disagg serve` makes one).
    cluster_secret: str = ""
    """Sent to register, required on every call to this worker, and the key of KV frames' MAC."""

    def __post_init__(self) -> None:
        require(":" in self.coordinator, "coordinator", f"must be HOST:PORT: {self.coordinator!r}")
        require_port(self.port, "port", allow_any=True)
        require(self.threads >= 0, "threads", "must be >= 0")


@dataclass(frozen=True)
class DecodeWorkerConfig:
    colocated: bool = False
    """Also serve Prefill, computing KV in place (the baseline role)."""
    kv_transport: Transport = "tcp"
    """How KV arrives: tcp (works across hosts) or ipc (same host only)."""
    ready_timeout_s: float = 30.0
    """Seconds for a handle's KV to arrive before the handle is freed."""
    claim_timeout_s: float = 30.0
    """Seconds for a Decode to claim a READY handle before it is freed."""
    # NOTE: `full` is the reservation blocks on demand replaced, kept as a measured baseline.
    kv_reservation: KVReservation = "on-demand"
    """KV at Allocate: the prompt + a lookahead, grown as it decodes; full: prompt + max_tokens."""

    def __post_init__(self) -> None:
        require(self.kv_transport in ("tcp", "ipc"), "kv_transport", "must be tcp or ipc")
        require(self.kv_reservation in ("on-demand", "full"), "kv_reservation", "on-demand|full")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        require(self.claim_timeout_s > 0, "claim_timeout_s", "must be > 0")


@dataclass(frozen=True)
class DispatchConfig:
    allocate_timeout_s: float = 5.0
    """Deadline of an Allocate call, in seconds."""
    prefill_timeout_s: float = 300.0
    """Deadline of a Prefill call, in seconds (long prompts on a CPU take a while)."""
    decode_timeout_s: float = 3600.0
    """Deadline of a whole Decode stream, in seconds."""
    free_timeout_s: float = 5.0
    """Deadline of a Free call, in seconds."""
    stall_timeout_s: float = 10.0
    """A decode stream silent this many seconds is cancelled and its sequence migrated."""
    max_migrations: int = 2
    """Times one request may move to another worker after a fault before it fails."""
    keepalive_s: float = 5.0
    """gRPC keepalive ping interval on the channels to workers, in seconds."""
    disagg_policy: DisaggPolicy = "auto"
    """Prefill on a prefill worker always, never (on the decode worker), or auto (by cost)."""
    max_local_prefill_tokens: int = 32
    """auto, until a prefill rate is measured: in place when at most this many are uncached."""
    in_place_stall_weight: float = 1.0
    """auto: one running stream's second of stall, in seconds of the new prompt's TTFT."""
    handle_lease_s: float = 10.0
    """Seconds a KV handle outlives its last renewal (each heartbeat reply); 0: no lease."""

    def __post_init__(self) -> None:
        for name in ("allocate_timeout_s", "prefill_timeout_s", "decode_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.free_timeout_s > 0, "free_timeout_s", "must be > 0")
        require(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")
        require(self.max_migrations >= 0, "max_migrations", "must be >= 0")
        require(self.keepalive_s > 0, "keepalive_s", "must be > 0")
        require(
            self.disagg_policy in ("always", "never", "auto"), "disagg_policy", "always|never|auto"
        )
        require(self.max_local_prefill_tokens >= 0, "max_local_prefill_tokens", "must be >= 0")
        require(self.in_place_stall_weight >= 0, "in_place_stall_weight", "must be >= 0")
        require(self.handle_lease_s >= 0, "handle_lease_s", "must be >= 0")


@dataclass(frozen=True)
class CoordinatorConfig:
    model: str = "default"
    """Model whose tokenizer and limits the front door uses; workers must serve the same."""
    served_model_name: str = ""
    """Name clients use in `model`; defaults to the model's own name."""
    host: str = "0.0.0.0"
    """Address the HTTP, KServe gRPC and control servers bind."""
    http_port: int = 8000
    """OpenAI and KServe REST."""
    grpc_port: int = 8001
    """KServe V2 gRPC (inference.GRPCInferenceService)."""
    control_port: int = 50050
    """Worker registry (Register, Heartbeat)."""
    heartbeat_interval_s: float = 1.0
    """Seconds between a worker's reports."""
    heartbeat_timeout_s: float = 3.0
    """A worker silent this many seconds is out of rotation."""
    max_waiting: int = 256
    """Requests that may wait for KV room before new ones are refused."""
    queue_timeout_s: float = 30.0
    """Longest wait for KV room, in seconds."""
    # NOTE: with any key set, every endpoint but health, readiness and metrics needs one, and
    # the tenant comes from the key, not from what the client claims.
    api_key: tuple[str, ...] = ()
    """An API key clients must send (`Authorization: Bearer KEY`, tenant `default`); repeatable."""
    api_keys: str = ""
    """A file of API keys, one `KEY TENANT` per line (`#` starts a comment)."""
    # NOTE: its own key, not an API key: a scrape sees every tenant's numbers. Prometheus
    # sends it with `authorization: {type: Bearer, credentials_file: ...}` in the scrape job.
    metrics_key: str = ""
    """When set, /metrics needs `Authorization: Bearer METRICS_KEY`; empty leaves it open."""

    # NOTE: best given as DISAGG_CLUSTER_SECRET, off the command line.
    cluster_secret: str = ""
    """Shared with the workers: every control call and KV frame must carry it; empty: none."""
    # NOTE: TLS is on the front doors (HTTP and KServe gRPC); the control port keeps the secret.
    tls_cert: str = ""
    """PEM certificate (chain) file: serve HTTPS and gRPC over TLS only; needs tls_key."""
    tls_key: str = ""
    """PEM private key file of tls_cert."""
    tls_ca: str = ""
    """PEM CA file: KServe gRPC clients must present a certificate it signed (mutual TLS)."""
    tenant_max_concurrent: int = 0
    """API requests one tenant may have running at once (more get 429); 0 is no limit."""
    # NOTE: bursts of up to a second's worth pass; more get 429 with Retry-After.
    tenant_max_rps: float = 0.0
    """Requests per second one tenant may start; 0 is no limit."""
    # NOTE: charged as used (prompt at start, each generated token); a tenant in debt gets 429.
    tenant_max_tpm: float = 0.0
    """Prompt plus generated tokens per minute one tenant may use; 0 is no limit."""
    # NOTE: shares of the admission queue while tenants wait for KV (coordinator/fair_queue.py).
    tenant_weights: str = ""
    """`TENANT=WEIGHT,...`: each tenant's share of KV room under contention; others weigh 1."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", tuple(self.api_key or ()))
        parse_tenant_weights(self.tenant_weights)  # NOTE: so a bad entry fails at startup
        require(self.tenant_max_concurrent >= 0, "tenant_max_concurrent", "must be >= 0")
        require(
            math.isfinite(self.tenant_max_rps) and self.tenant_max_rps >= 0,
            "tenant_max_rps",
            "must be a finite number >= 0",
        )
        require(
            math.isfinite(self.tenant_max_tpm) and self.tenant_max_tpm >= 0,
            "tenant_max_tpm",
            "must be a finite number >= 0",
        )
        require(all(self.api_key), "api_key", "must not be empty")
        require(bool(self.tls_cert) == bool(self.tls_key), "tls_key", "give tls_cert and tls_key")
        require(not self.tls_ca or bool(self.tls_cert), "tls_ca", "needs tls_cert and tls_key")
        for name in ("http_port", "grpc_port", "control_port"):
            require_port(getattr(self, name), name)
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        require(
            self.heartbeat_timeout_s > self.heartbeat_interval_s,
            "heartbeat_timeout_s",
            "must exceed heartbeat_interval_s",
        )
        require(self.max_waiting >= 0, "max_waiting", "must be >= 0")
        require(self.queue_timeout_s > 0, "queue_timeout_s", "must be > 0")

    @property
    def tenant_weight_map(self) -> dict[str, float]:
        return parse_tenant_weights(self.tenant_weights)


@dataclass(frozen=True)
class ServeConfig:
    mode: Mode = "disaggregated"
    """disaggregated (prefill and decode workers) or colocated (workers doing both)."""
    num_prefill_workers: int = 1
    """Prefill worker processes (disaggregated mode)."""
    num_decode_workers: int = 1
    """Decode (or colocated) worker processes."""
    kv_transport: Transport = "ipc"
    """How KV crosses between this machine's workers: ipc or tcp."""
    worker_threads: int = 0
    """torch threads per worker; 0 splits the machine's cores evenly."""
    restart_drained: bool = False
    """Restart a worker that exited 0 after SIGTERM drained it (a rolling restart)."""

    def __post_init__(self) -> None:
        require(self.mode in ("disaggregated", "colocated"), "mode", "disaggregated|colocated")
        require(self.num_decode_workers >= 1, "num_decode_workers", "must be >= 1")
        needs_prefill = self.mode == "disaggregated"
        require(
            self.num_prefill_workers >= 1 or not needs_prefill,
            "num_prefill_workers",
            "must be >= 1 in disaggregated mode",
        )
        require(self.kv_transport in ("tcp", "ipc"), "kv_transport", "must be tcp or ipc")
        require(self.worker_threads >= 0, "worker_threads", "must be >= 0")
