"""Command-line options that can also come from `DISAGG_<OPTION>` environment variables."""

from __future__ import annotations

import argparse
import os


def env_name(flag: str) -> str:
    """`--kv-cache-memory` -> `DISAGG_KV_CACHE_MEMORY`."""
    return "DISAGG_" + flag.lstrip("-").replace("-", "_").upper()


def add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: object) -> None:
    """Like `add_argument`, but the environment variable, when set, replaces the default.

    NOTE: argparse runs `type` over string defaults, so an environment value is
    parsed and validated exactly like the same value given on the command line.
    """
    name = env_name(flag)
    if name in os.environ:
        kwargs["default"] = os.environ[name]
        kwargs.pop("required", None)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--model", default="default", help="default, a .gguf file or an HF dir")
    add_option(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add_option(
        parser,
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 where the hardware computes it natively",
    )
    add_option(parser, "--kv-cache-memory", type=int, default=1 << 30, help="KV pool bytes")
    add_option(parser, "--kv-blocks", type=int, default=None, help="KV pool size in blocks")
    add_option(parser, "--block-size", type=int, default=16, help="tokens per KV block")
    add_option(parser, "--max-num-seqs", type=int, default=256, help="most sequences per batch")
    add_option(
        parser, "--max-num-batched-tokens", type=int, default=2048, help="prefill token budget"
    )


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_option(parser, "--coordinator", default="127.0.0.1:50050", help="coordinator HOST:PORT")
    add_option(parser, "--host", default="0.0.0.0", help="address the worker binds")
    add_option(parser, "--port", type=int, default=0, help="gRPC port; 0 picks a free one")
    add_option(parser, "--advertise-host", default="127.0.0.1", help="host others reach us at")
    add_option(parser, "--worker-id", default="", help="unique name (default role-host-pid)")
    add_option(parser, "--threads", type=int, default=0, help="torch threads; 0 = torch default")


def model_args(args: argparse.Namespace) -> list[str]:
    """The model options as command-line words, to hand on to child processes."""
    words = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    words += ["--kv-cache-memory", str(args.kv_cache_memory), "--block-size", str(args.block_size)]
    words += ["--max-num-seqs", str(args.max_num_seqs)]
    words += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_blocks is not None:
        words += ["--kv-blocks", str(args.kv_blocks)]
    return words
