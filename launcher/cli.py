"""`disagg`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import DisaggError
from disagg.model.tokenizer import TextStream, apply_chat_template, encode_prompt
from launcher.options import add_model_options, add_option, add_worker_options, model_args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        num_kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def stream_text(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
    """Run one request and yield its text as it is generated, stop strings applied."""
    seq = engine.add_request(prompt_ids, params)
    stream = TextStream(engine.tokenizer, stop=params.stop)
    emitted = 0
    while not seq.is_finished:
        engine.step()
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


def worker_config(args: argparse.Namespace):
    from disagg.rpc.worker_process import WorkerConfig

    return WorkerConfig(
        coordinator=args.coordinator,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        worker_id=args.worker_id,
        threads=args.threads,
    )


def run_prefill_worker(args: argparse.Namespace) -> int:
    from prefill_worker.main import main

    return main(engine_config(args), worker_config(args))


def run_decode_worker(args: argparse.Namespace) -> int:
    from decode_worker.main import DecodeWorkerConfig, main

    decode = DecodeWorkerConfig(
        colocated=args.colocated,
        kv_transport=args.kv_transport,
        ready_timeout_s=args.ready_timeout,
        claim_timeout_s=args.claim_timeout,
    )
    return main(engine_config(args), worker_config(args), decode)


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.main import CoordinatorConfig, main

    config = CoordinatorConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        control_port=args.control_port,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_waiting=args.max_waiting,
        queue_timeout_s=args.queue_timeout,
    )
    return main(config)


def run_serve(args: argparse.Namespace) -> int:
    from launcher.serve import ClusterPlan, serve

    plan = ClusterPlan(
        model_args=model_args(args),
        mode=args.mode,
        num_prefill=args.prefill_workers,
        num_decode=args.decode_workers,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        control_port=args.control_port,
        served_model_name=args.served_model_name,
        kv_transport=args.kv_transport,
        worker_threads=args.worker_threads,
        restart_drained=args.restart_drained,
    )
    return serve(plan)


def add_coordinator_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--served-model-name", default="", help="name clients use for the model")
    add_option(parser, "--host", default="0.0.0.0", help="address the servers bind")
    add_option(parser, "--http-port", type=int, default=8000, help="OpenAI and KServe REST")
    add_option(parser, "--grpc-port", type=int, default=8001, help="KServe V2 gRPC")
    add_option(parser, "--control-port", type=int, default=50050, help="worker registry gRPC")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="the whole cluster on this machine")
    add_model_options(serve)
    add_coordinator_options(serve)
    add_option(serve, "--mode", default="disaggregated", choices=["disaggregated", "colocated"])
    add_option(serve, "--prefill-workers", type=int, default=1)
    add_option(serve, "--decode-workers", type=int, default=1)
    add_option(serve, "--kv-transport", default="ipc", choices=["tcp", "ipc"])
    add_option(serve, "--worker-threads", type=int, default=0, help="0 = split cores evenly")
    add_option(
        serve, "--restart-drained", action="store_true", help="restart workers SIGTERM drained"
    )
    serve.set_defaults(func=run_serve)

    coordinator = commands.add_parser("coordinator", help="the front door and scheduler")
    add_option(coordinator, "--model", default="default", help="default, a .gguf or an HF dir")
    add_coordinator_options(coordinator)
    add_option(coordinator, "--heartbeat-timeout", type=float, default=3.0)
    add_option(coordinator, "--max-waiting", type=int, default=256, help="KV wait queue bound")
    add_option(coordinator, "--queue-timeout", type=float, default=30.0)
    coordinator.set_defaults(func=run_coordinator)

    prefill = commands.add_parser("prefill-worker", help="runs prompts, ships their KV")
    add_worker_options(prefill)
    prefill.set_defaults(func=run_prefill_worker)

    decode = commands.add_parser("decode-worker", help="holds KV blocks, decodes in batches")
    add_worker_options(decode)
    add_option(decode, "--colocated", action="store_true", help="also prefill (baseline role)")
    add_option(decode, "--kv-transport", default="tcp", choices=["tcp", "ipc"])
    add_option(decode, "--ready-timeout", type=float, default=30.0, help="s for KV to arrive")
    add_option(decode, "--claim-timeout", type=float, default=30.0, help="s for Decode to claim")
    decode.set_defaults(func=run_decode_worker)
    generate = commands.add_parser("generate", help="generate from a prompt, or chat on stdin")
    add_model_options(generate)
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
    try:
        return args.func(args)
    except (DisaggError, ValueError) as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
