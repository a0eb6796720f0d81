"""A fake cluster for front-door tests: the real Generator and Frontend over a scheduler that
echoes the prompt back, one token per character."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

from coordinator.admission import Admission
from coordinator.cluster_scheduler import TokenUpdate
from coordinator.frontend import Frontend
from coordinator.generation import Generator
from coordinator.metrics import Metrics
from disagg.model.loader import ModelInfo

MODEL = "fake-model"


class CharTokenizer:
    """One token per character, so the echoed text is the prompt itself."""

    chat_template = "fake"
    eos_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [ord(c) for c in text]


class EchoDispatcher:
    """Generates the prompt back (cycling it when ignore_eos) and, like the real one, needs an
    await to free a request's KV when it ends; counts the streams opened and the frees done."""

    def __init__(
        self, delay_s: float = 0.0, fail: Exception | None = None, fail_after: int = 0
    ) -> None:
        self.delay_s = delay_s
        self.fail, self.fail_after = fail, fail_after
        self.num_started = self.num_freed = self.num_tokens = 0

    def check_fits(self, prompt_ids, params) -> None:
        pass

    @property
    def num_open(self) -> int:
        return self.num_started - self.num_freed

    async def generate(self, prompt_ids, params, trace):
        self.num_started += 1
        try:
            trace.first_token_s = time.time()
            trace.prefill_worker, trace.decode_worker = "prefill-1", "decode-1"
            count = params.max_tokens if params.ignore_eos else len(prompt_ids)
            count = min(count, params.max_tokens)
            for i in range(count):
                if self.fail is not None and i == self.fail_after:
                    raise self.fail
                await asyncio.sleep(self.delay_s)
                self.num_tokens += 1
                last = i + 1 == count
                reason = ("length" if count == params.max_tokens else "stop") if last else None
                yield TokenUpdate(prompt_ids[i % len(prompt_ids)], time.time(), None, reason)
        finally:
            await asyncio.sleep(0.005)  # the Free RPC: cancelling it would leak the blocks
            self.num_freed += 1


def make_frontend(dispatcher: EchoDispatcher | None = None, is_ready: bool = True) -> Frontend:
    model = ModelInfo(MODEL, CharTokenizer(), max_model_len=512, eos_token_ids={0})
    metrics = Metrics(MODEL)
    registry = SimpleNamespace(healthy=lambda role: [role] if is_ready else [])
    generator = Generator(dispatcher or EchoDispatcher(), model, metrics)
    return Frontend(generator, model, MODEL, registry, Admission(), metrics)


async def call_asgi(app, path: str, body: dict, disconnect_after_s: float) -> list[dict]:
    """Drive the app like a server whose client leaves `disconnect_after_s` into the response."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
        "query_string": b"", "headers": [(b"content-type", b"application/json")],
        "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "",
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent
