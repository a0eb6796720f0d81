"""`disagg-bench headline`: each scenario is a valid `run`, and the peer is launched as documented."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import headline
from bench.cli import main
from bench.peer import TransformersServe
from bench.serving import commands


@pytest.mark.parametrize("name", list(headline.SCENARIOS))
def test_every_scenario_builds_its_plan(name, tmp_path, tokenizer):
    args = argparse.Namespace(model="default", seed=0, num_requests=3)
    scenario = headline.SCENARIOS[name]
    plan, _ = commands.build_plan(headline.run_args(scenario, args, tmp_path))
    assert len(plan.workload) == 3 + scenario.warmup and plan.slo.text == scenario.slo
    assert plan.options.is_ignore_eos and plan.options.temperature == 0


def test_the_peer_is_asked_for_exactly_max_tokens_from_our_weights(tokenizer):
    peer = TransformersServe("default", "float32", threads=2)
    command = peer.command()
    assert command[1:3] == ["serve", "--continuous-batching"] and command[-1] == peer.model_dir
    assert command[command.index("--dtype") + 1] == "float32"
    assert json.loads(peer.extra_body["generation_config"]) == {"eos_token_id": -1}
    assert peer.extra_body["ignore_eos"] is None  # it answers 422 to the field


def test_unknown_servers_are_refused(capsys):
    assert main(["headline", "--servers", "vllm"]) == 2
    assert "unknown servers" in capsys.readouterr().err
