"""Flags and DISAGG_* variables generated from the config dataclasses."""

from __future__ import annotations

import os
from unittest import mock

from disagg.config import DecodeWorkerConfig, DispatchConfig, EngineConfig
from launcher.cli import build_parser
from launcher.options import config_from_args, config_to_args, flag_name

EXISTING_FLAGS = {
    "serve": ["--model", "--served-model-name", "--prefill-workers", "--decode-workers", "--mode",
              "--http-port", "--grpc-port", "--device", "--dtype", "--kv-transport",
              "--worker-threads", "--kv-cache-memory", "--kv-blocks", "--block-size"],
    "coordinator": ["--model", "--host", "--http-port", "--grpc-port", "--control-port",
                    "--heartbeat-timeout", "--max-waiting", "--queue-timeout"],
    "prefill-worker": ["--coordinator", "--model", "--device", "--advertise-host", "--port",
                       "--worker-id", "--threads", "--max-num-seqs", "--max-num-batched-tokens"],
    "decode-worker": ["--coordinator", "--colocated", "--kv-transport", "--ready-timeout",
                      "--claim-timeout", "--kv-cache-memory", "--kv-blocks"],
}  # fmt: skip


def subparsers() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def test_every_existing_flag_still_exists():
    commands = subparsers()
    for command, flags in EXISTING_FLAGS.items():
        known = set(commands[command]._option_string_actions)
        assert not set(flags) - known, command


def test_flag_names_drop_count_prefixes_and_unit_suffixes():
    assert flag_name("num_kv_blocks") == "--kv-blocks"
    assert flag_name("kv_cache_memory_bytes") == "--kv-cache-memory"
    assert flag_name("ready_timeout_s") == "--ready-timeout"
    assert flag_name("max_num_seqs") == "--max-num-seqs"


def test_defaults_and_help_come_from_the_dataclass():
    decode = subparsers()["decode-worker"]
    action = decode._option_string_actions["--claim-timeout"]
    assert action.default == DecodeWorkerConfig.claim_timeout_s
    assert "Decode to claim" in action.help and "DISAGG_CLAIM_TIMEOUT" in action.help
    assert decode._option_string_actions["--dtype"].choices == [
        "auto", "float32", "bfloat16", "float16"
    ]  # fmt: skip


def test_dispatch_timeouts_are_settable_from_the_cli_and_the_environment():
    with mock.patch.dict(os.environ, {"DISAGG_FREE_TIMEOUT": "2.5"}):
        os.environ.pop("DISAGG_DISAGG_POLICY", None)  # the test session pins it
        args = build_parser().parse_args(["coordinator", "--prefill-timeout", "12"])
    dispatch = config_from_args(DispatchConfig, args)
    assert dispatch == DispatchConfig(prefill_timeout_s=12.0, free_timeout_s=2.5)
    assert dispatch.disagg_policy == "auto", "prefill placement is decided by cost by default"


def test_an_environment_switch_reads_false_as_false():
    with mock.patch.dict(os.environ, {"DISAGG_COLOCATED": "0"}):
        args = build_parser().parse_args(["decode-worker"])
    assert config_from_args(DecodeWorkerConfig, args).colocated is False


def test_a_config_survives_the_trip_to_a_child_process():
    engine = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=8, max_model_len=512)
    args = build_parser().parse_args(["prefill-worker", *config_to_args(engine)])
    assert config_from_args(EngineConfig, args) == engine
