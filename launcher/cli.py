"""`disagg`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from disagg.config import (
    CoordinatorConfig,
    DecodeWorkerConfig,
    DispatchConfig,
    EngineConfig,
    ServeConfig,
    WorkerConfig,
)
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import DisaggError
from disagg.logs import PROGRESS_LOGGER
from disagg.model.tokenizer import TextStream, apply_chat_template, encode_prompt
from launcher.options import add_config_options, add_option, config_from_args
from launcher.serve import SERVE_DECODE_FIELDS


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return config_from_args(EngineConfig, args)


def stream_text(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
    """Run one request and yield its text as it is generated, stop strings applied."""
    seq = engine.add_request(prompt_ids, params)
    stream = TextStream(engine.tokenizer, stop=params.stop)
    emitted = 0
    while not seq.is_finished:
        output = engine.step()
        if output.error is not None:
            raise output.error
        delta, stopped = stream.push(seq.output_token_ids[emitted:])
        emitted = seq.num_output_tokens
        yield delta
        if stopped:
            engine.abort(seq.request_id)
            return
    yield stream.finish()


def run_generate(args: argparse.Namespace) -> int:
    engine = LLMEngine(engine_config(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        print(
            f"disagg: {engine.loaded.name} ready; type a message, Ctrl-D to quit", file=sys.stderr
        )
        prompts = (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        if not prompt.strip():
            continue
        if args.raw:
            ids = encode_prompt(engine.tokenizer, prompt)
        else:
            ids = apply_chat_template(engine.tokenizer, [{"role": "user", "content": prompt}])
        for delta in stream_text(engine, ids, params):
            print(delta, end="", flush=True)
        print()
    return 0


def run_prefill_worker(args: argparse.Namespace) -> int:
    from prefill_worker.main import main

    return main(engine_config(args), config_from_args(WorkerConfig, args))


def run_decode_worker(args: argparse.Namespace) -> int:
    from decode_worker.main import main

    decode = config_from_args(DecodeWorkerConfig, args)
    return main(engine_config(args), config_from_args(WorkerConfig, args), decode)


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.main import main

    return main(config_from_args(CoordinatorConfig, args), config_from_args(DispatchConfig, args))


def run_serve(args: argparse.Namespace) -> int:
    from launcher.serve import ClusterPlan, serve

    engine = engine_config(args)
    plan = ClusterPlan(
        engine=engine,
        serve=config_from_args(ServeConfig, args),
        coordinator=config_from_args(CoordinatorConfig, args, model=engine.model),
        dispatch=config_from_args(DispatchConfig, args),
        decode=config_from_args(DecodeWorkerConfig, args),  # NOTE: role, transport: serve's
    )
    return serve(plan)


def add_coordinator_options(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, CoordinatorConfig)
    add_config_options(parser, DispatchConfig)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, EngineConfig)
    add_config_options(parser, WorkerConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="the whole cluster on this machine")
    add_config_options(serve, EngineConfig)
    add_coordinator_options(serve)
    add_config_options(serve, ServeConfig)
    add_config_options(serve, DecodeWorkerConfig, exclude=SERVE_DECODE_FIELDS)
    serve.set_defaults(func=run_serve)

    coordinator = commands.add_parser("coordinator", help="the front door and scheduler")
    add_coordinator_options(coordinator)
    coordinator.set_defaults(func=run_coordinator)

    prefill = commands.add_parser("prefill-worker", help="runs prompts, ships their KV")
    add_worker_options(prefill)
    prefill.set_defaults(func=run_prefill_worker)

    decode = commands.add_parser("decode-worker", help="holds KV blocks, decodes in batches")
    add_worker_options(decode)
    add_config_options(decode, DecodeWorkerConfig)
    decode.set_defaults(func=run_decode_worker)
    generate = commands.add_parser("generate", help="generate from a prompt, or chat on stdin")
    add_config_options(generate, EngineConfig)
    generate.add_argument("--prompt", help="one prompt; without it, read messages from stdin")
    generate.add_argument("--raw", action="store_true", help="no chat template")
    add_option(generate, "--max-tokens", type=int, default=256)
    add_option(generate, "--temperature", type=float, default=0.0)
    add_option(generate, "--top-p", type=float, default=1.0)
    add_option(generate, "--top-k", type=int, default=0)
    add_option(generate, "--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.set_defaults(func=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)
    try:
        return args.func(args)
    except (DisaggError, ValueError) as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
