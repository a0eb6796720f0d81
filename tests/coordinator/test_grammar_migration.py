"""A constrained request across a fault, and grammar compiles kept off the engine thread, on
in-process clusters (tiny model).

A decode stream that fails mid-request moves to the other decode worker with prompt + output
so far as its prompt; the new workers rebuild the grammar from every token the client has,
so the output is the undisturbed run's, one valid document. And however long a schema takes
to compile, the thread that steps the batch never does it: other streams keep their pace.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
import uuid

import jsonschema
import pytest

from decode_worker.service import DecodeStream
from disagg.engine.sequence import Sequence
from disagg.grammar import GrammarCompiler, GrammarState
from tests.cluster_harness import post_json
from tests.inprocess_cluster import InProcessCluster

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 18, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "age", "ok"],
}
FAIL_AT_NUM_TOKENS = 6
"""The decode stream fails once its sequence has this many output tokens (the first among
them), well inside the ~15-token object."""


class TwoDecodeWorkers(InProcessCluster):
    """The coordinator, a prefill worker and two decode workers, so a stream can move."""

    def _roles_to_run(self) -> list:
        from decode_worker import main as decode_main
        from disagg.config import DecodeWorkerConfig, EngineConfig

        engine = EngineConfig(**self._engine)
        second = self.worker_config("decode-1")
        extra = decode_main.run(engine, second, DecodeWorkerConfig(kv_transport="ipc"))
        return [*super()._roles_to_run(), extra]


def _json_chat(url: str, schema: dict) -> dict:
    body = {
        "messages": [{"role": "user", "content": "A person, please."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        "temperature": 0,
        "max_tokens": 60,
    }
    status, reply = post_json(f"{url}/v1/chat/completions", body)
    assert status == 200, reply
    return reply["choices"][0]


def _migrations(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r"disagg_migrations_total\{[^}]*\} (\S+)", text)
    return sum(float(value) for value in found)


def test_a_constrained_stream_migrated_mid_request_is_the_undisturbed_document(
    tiny_model_dir, monkeypatch
):
    failed: set[str] = set()
    on_token = DecodeStream.on_token

    def fail_once(self: DecodeStream, seq: Sequence) -> None:
        """The first decode worker to reach FAIL_AT_NUM_TOKENS breaks this request's stream."""
        if seq.num_output_tokens == FAIL_AT_NUM_TOKENS and seq.request_id not in failed:
            failed.add(seq.request_id)
            self.on_error(seq, RuntimeError("injected decode fault"))
            return
        on_token(self, seq)

    with TwoDecodeWorkers(tiny_model_dir) as cluster:
        undisturbed = _json_chat(cluster.url, SCHEMA)
        assert undisturbed["finish_reason"] == "stop"
        assert _migrations(cluster.url) == 0
        with monkeypatch.context() as patch:
            patch.setattr(DecodeStream, "on_token", fail_once)
            migrated = _json_chat(cluster.url, SCHEMA)
        assert len(failed) == 1, "the fault hit the request"
        assert _migrations(cluster.url) == 1
        assert migrated["message"]["content"] == undisturbed["message"]["content"]
        assert migrated["finish_reason"] == "stop"
        jsonschema.validate(json.loads(migrated["message"]["content"]), SCHEMA)
        cluster.wait_all_blocks_free()


@pytest.fixture
def grammar_threads(monkeypatch) -> list[str]:
    """Names of the threads that compile grammars or build grammar states, as they do."""
    names: list[str] = []
    compile_, from_tokens = GrammarCompiler.compile, GrammarState.from_tokens.__func__

    def compile_recorded(self: GrammarCompiler, spec: object) -> object:
        names.append(threading.current_thread().name)
        return compile_(self, spec)

    def from_tokens_recorded(cls: type, compiled: object, token_ids: object) -> GrammarState:
        names.append(threading.current_thread().name)
        return from_tokens(cls, compiled, token_ids)

    monkeypatch.setattr(GrammarCompiler, "compile", compile_recorded)
    monkeypatch.setattr(GrammarState, "from_tokens", classmethod(from_tokens_recorded))
    return names


def test_grammars_are_compiled_and_rebuilt_off_the_engine_thread(
    inprocess_cluster, grammar_threads
):
    # NOTE: a schema no engine has seen, so that every worker compiles it now
    schema = {**SCHEMA, "title": f"never-seen-{uuid.uuid4().hex}"}
    choice = _json_chat(inprocess_cluster.url, schema)
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert grammar_threads.count("engine-loop") == 0, grammar_threads
    compile_threads = [n for n in grammar_threads if n.startswith("grammar-compile")]
    assert len(compile_threads) >= 3, grammar_threads  # prefill compile + state, decode state
    inprocess_cluster.wait_all_blocks_free()
