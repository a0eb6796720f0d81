"""`kv.receive` spans from the handle hooks: under the context Allocate ran in, from the first
layer in to READY, or to the handle's end with the reason when it never got there."""

from __future__ import annotations

import pytest
import torch

from decode_worker.kv_handle import FreeReason
from decode_worker.kv_handles import HandleTable
from decode_worker.kv_receive_spans import KVReceiveSpans
from disagg import tracing
from disagg.kv.block_manager import BlockManager
from disagg.kv.cache import PagedKVCache
from tests.decode_worker.test_kv_handles import LAYOUT, send_prompt
from tests.helpers import recorded_spans


@pytest.fixture
def exporter():
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture
def table() -> HandleTable:
    manager = BlockManager(num_blocks=16, block_size=LAYOUT.block_size)
    cache = PagedKVCache(LAYOUT, 16, torch.device("cpu"))
    return HandleTable(manager, cache, ready_timeout_s=5, claim_timeout_s=5,
                       hooks=[KVReceiveSpans()])  # fmt: skip


def test_a_handle_that_gets_its_kv_has_one_span_under_its_allocate(exporter, table):
    with tracing.span("Allocate") as allocate:
        handle = table.allocate("r1", [1, 2, 3, 4, 5], 4)
    assert exporter.get_finished_spans()[-1].name == "Allocate", "nothing before the KV"
    send_prompt(table, handle)
    (received,) = [s for s in exporter.get_finished_spans() if s.name == "kv.receive"]
    assert received.parent.span_id == allocate.get_span_context().span_id
    assert received.attributes["kv_bytes"] == handle.nbytes > 0
    assert received.attributes["num_prompt_tokens"] == 5
    assert "failure" not in received.attributes
    table.claim(handle.handle_id)
    table.release(handle.handle_id, FreeReason.FINISHED)
    assert len([s for s in exporter.get_finished_spans() if s.name == "kv.receive"]) == 1


def test_a_handle_that_never_gets_its_kv_says_why(exporter, table):
    handle = table.allocate("r2", [1, 2, 3], 4)
    table.fail(handle.handle_id, FreeReason.PREFILL_FAILED)
    (received,) = [s for s in exporter.get_finished_spans() if s.name == "kv.receive"]
    assert received.attributes["failure"] == FreeReason.PREFILL_FAILED
    assert received.attributes["kv_bytes"] == 0
