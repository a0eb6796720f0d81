"""A migration in the request's trace: an event on the request's span saying why, from which
worker and after how many tokens, then a second admission span for the new placement."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.request_timing import RequestTrace
from disagg import tracing
from disagg.engine.sampling_params import SamplingParams
from tests.coordinator.fake_workers import FakeWorker, expected_tokens, fake_cluster
from tests.helpers import recorded_spans

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 12


@pytest.fixture
def exporter():
    with recorded_spans() as exporter:
        yield exporter


def test_a_migration_is_an_event_then_a_second_admission(exporter):
    broken, healthy = FakeWorker("d0", break_after=4), FakeWorker("d1")  # d0 is picked first

    async def scenario() -> list[int]:
        scheduler = fake_cluster([broken, healthy], [FakeWorker("p0")])
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        with tracing.span("request"):
            generated = scheduler.generate(PROMPT, params, RequestTrace("r"))
            return [update.token_id async for update in generated]

    assert asyncio.run(scenario()) == expected_tokens(PROMPT, MAX_TOKENS)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["request"]
    (moved,) = [e for e in request.events if e.name == "migration"]
    assert dict(moved.attributes) == {"cause": "decode_failed", "worker": "d0", "num_produced": 5}
    admissions = [s for s in exporter.get_finished_spans() if s.name == "admission"]
    assert [a.attributes["decode_worker"] for a in admissions] == ["d0", "d1"]
    assert all(a.parent.span_id == request.context.span_id for a in admissions)
    assert admissions[0].end_time <= moved.timestamp <= admissions[1].start_time
    assert [a.attributes["num_prompt_tokens"] for a in admissions] == [len(PROMPT), len(PROMPT) + 5]
