"""What every API endpoint needs from the coordinator, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.admission import Admission
from coordinator.errors import NotFoundError
from coordinator.generation import Generator
from coordinator.generation_runner import GenerationRunner
from coordinator.metrics import Metrics
from coordinator.quotas import TenantQuotas
from coordinator.registry import WorkerRegistry
from disagg.model.loader import ModelInfo

SERVER_NAME = "disagg"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
"""The served model's only version (KServe names versions; OpenAI does not)."""


@dataclass
class Frontend:
    generator: Generator
    model: ModelInfo
    served_name: str
    """The name clients use for the model (`model` in OpenAI, the path segment in KServe)."""
    registry: WorkerRegistry
    admission: Admission
    metrics: Metrics
    quotas: TenantQuotas = field(default_factory=TenantQuotas)
    """Per-tenant concurrency and rate limits (429), checked once a request is parsed."""

    @property
    def runner(self) -> GenerationRunner:
        """Runs generations for every protocol (it holds no state of its own)."""
        return GenerationRunner(self.generator)

    @property
    def is_ready(self) -> bool:
        """At least one worker for each phase."""
        return bool(self.registry.healthy("prefill")) and bool(self.registry.healthy("decode"))

    def knows_model(self, name: str) -> bool:
        return name in (self.served_name, self.model.name)

    def check_model(self, name: str, version: str | None = None) -> None:
        """NotFoundError (404) for a model, or a version of it, this server does not serve."""
        if not self.knows_model(name):
            raise NotFoundError(f"unknown model {name!r}; this server serves {self.served_name!r}")
        if version not in (None, "", MODEL_VERSION):
            raise NotFoundError(
                f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}",
                "version",
            )
