from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from disagg.model.loader import LoadedModel, load_model

# NOTE: clusters that tests start as processes (`disagg serve`, `disagg coordinator`)
# read their flags' defaults from DISAGG_* variables. Tests of the disaggregated path
# want every prompt on a prefill worker; the ones about placement pass the flag.
os.environ.setdefault("DISAGG_DISAGG_POLICY", "always")


@pytest.hookimpl(tryfirst=True)  # NOTE: before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that loads the real default model is `slow`, by the marker's own definition,
    whether or not its module says so: it costs seconds of loading and full-size forwards."""
    for item in items:
        if "default_fp32" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_fp32() -> LoadedModel:
    """The real default model in float32, loaded once for the whole session."""
    return load_model("default", torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model with the default model's tokenizer, as an HF directory."""
    from tests.inprocess_cluster import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model as transformers loads it: the reference for the in-process cluster."""
    return load_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def inprocess_cluster(tiny_model_dir: Path):
    """Coordinator, prefill and decode worker in this process, on the tiny model; shared by
    every test that needs no special configuration (each leaves every KV block free)."""
    from tests.inprocess_cluster import InProcessCluster

    with InProcessCluster(tiny_model_dir) as cluster:
        yield cluster
