"""What every API endpoint needs from the coordinator, in one object."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.admission import Admission
from coordinator.generation import Generator
from coordinator.metrics import Metrics
from coordinator.registry import WorkerRegistry
from disagg.model.loader import ModelInfo

SERVER_NAME = "disagg"
SERVER_VERSION = "0.1.0"


@dataclass
class Frontend:
    generator: Generator
    model: ModelInfo
    served_name: str
    """The name clients use for the model (`model` in OpenAI, the path segment in KServe)."""
    registry: WorkerRegistry
    admission: Admission
    metrics: Metrics

    @property
    def is_ready(self) -> bool:
        """At least one worker for each phase."""
        return bool(self.registry.healthy("prefill")) and bool(self.registry.healthy("decode"))

    def knows_model(self, name: str) -> bool:
        return name in (self.served_name, self.model.name)
