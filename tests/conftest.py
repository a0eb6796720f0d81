from __future__ import annotations

import pytest
import torch

from disagg.model.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def default_fp32() -> LoadedModel:
    """The real default model in float32, loaded once for the whole session."""
    return load_model("default", torch.float32, torch.device("cpu"))
