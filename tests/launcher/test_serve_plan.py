"""`disagg serve` hands the decode-worker settings to its decode (or colocated) workers."""

from __future__ import annotations

import pytest

from disagg.config import DecodeWorkerConfig, ServeConfig
from launcher.cli import build_parser
from launcher.options import config_from_args
from launcher.serve import ClusterPlan


def test_serve_takes_the_decode_worker_settings():
    args = build_parser().parse_args(["serve", "--kv-reservation", "full"])
    assert config_from_args(DecodeWorkerConfig, args).kv_reservation == "full"
    default = build_parser().parse_args(["serve"])
    assert config_from_args(DecodeWorkerConfig, default).kv_reservation == "on-demand"


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_kv_reservation_reaches_the_decode_workers_only(mode: str):
    decode = DecodeWorkerConfig(kv_reservation="full")
    plan = ClusterPlan(serve=ServeConfig(mode=mode), decode=decode)
    workers = [(name, command) for name, command in plan.commands() if name != "coordinator"]
    for name, command in workers:
        is_decode = name.startswith(("decode", "colocated"))
        assert ("--kv-reservation" in command) == is_decode, name
        if is_decode:
            assert command[command.index("--kv-reservation") + 1] == "full"
            assert command.count("--kv-transport") == (mode == "disaggregated")
            assert ("--colocated" in command) == (mode == "colocated")
