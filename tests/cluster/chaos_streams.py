"""The client side of the chaos test: a batch of streaming requests over OpenAI (completions
and chat, SSE) and KServe V2 gRPC (ModelStreamInfer), run at once, each recording what its
client saw: the text, the finishes, the [DONE]s, the usage and the workers that served it."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tests.cluster_harness import ServeProcess

TIMEOUT_S = 240.0
FINAL_FLAG = "triton_final_response"


@dataclass
class Stream:
    """One streaming request as its client saw it; `protocol`: completions, chat or grpc."""

    protocol: str
    prompt: str
    max_tokens: int
    text: str = ""
    num_chunks: int = 0
    finishes: list[str] = field(default_factory=list)
    num_done: int = 0
    num_tokens: int | None = None
    workers: set[str] = field(default_factory=set)
    """Every prefill and decode worker id the request's timings name."""

    def run(self, serve: ServeProcess, model: str) -> Stream:
        if self.protocol == "grpc":
            return self._run_grpc(serve, model)
        return self._run_openai(serve.url)

    def _run_openai(self, url: str) -> Stream:
        body = {
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.protocol == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        path = "/v1/chat/completions" if self.protocol == "chat" else "/v1/completions"
        request = urllib.request.Request(
            url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            for raw in response:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    self.num_done += 1
                elif line.startswith("data: "):
                    self._take(json.loads(line[len("data: ") :]))
        return self

    def _take(self, event: dict) -> None:
        assert "error" not in event, event
        if event.get("usage"):
            self.num_tokens = event["usage"]["completion_tokens"]
        for timings in event.get("metrics") or ():
            self.workers |= {timings["prefill_worker"], timings["decode_worker"]}
        for choice in event.get("choices", []):
            self.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            self.num_chunks += 1
            if choice.get("finish_reason"):
                self.finishes.append(choice["finish_reason"])

    def _run_grpc(self, serve: ServeProcess, model: str) -> Stream:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            tensor = triton.InferInput("text_input", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([self.prompt.encode()], dtype=object))
            params = {"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
            client.async_stream_infer(model, [tensor], parameters=params)
            self._take_grpc(responses)
        finally:
            client.stop_stream()
            client.close()
        return self

    def _take_grpc(self, responses: queue.Queue) -> None:
        deadline_s = time.monotonic() + TIMEOUT_S
        while True:
            result, error = responses.get(timeout=max(0.0, deadline_s - time.monotonic()))
            assert error is None, error
            self.text += result.as_numpy("text_output")[0].decode()
            self.num_chunks += 1
            parameters = result.get_response().parameters
            if parameters[FINAL_FLAG].bool_param:
                self.finishes.append(result.as_numpy("finish_reason")[0].decode())
                self.num_tokens = int(result.as_numpy("token_count")[0])
                self.num_done += 1
                for key in ("prefill_worker", "decode_worker"):
                    self.workers |= set(parameters[key].string_param.split(","))
                return


def run_all(
    serve: ServeProcess, model: str, batch: list[Stream], fault=None, before=None
) -> list[Stream]:
    """Run every stream at once; `before()` runs first, `fault(batch)` alongside the
    streams, both from the test's thread."""
    if before is not None:
        before()
    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(stream.run, serve, model) for stream in batch]
        if fault is not None:
            fault(batch)
        return [future.result() for future in futures]


def check_same(disturbed: list[Stream], undisturbed: list[Stream]) -> None:
    """One whole stream each, with the undisturbed run's greedy text."""
    for got, want in zip(disturbed, undisturbed):
        assert got.text == want.text, (got.protocol, got.prompt[:40], got.text, want.text)
        assert got.finishes == ["length"] and got.num_done == 1, (got.protocol, got.finishes)
        assert got.num_tokens == got.max_tokens
