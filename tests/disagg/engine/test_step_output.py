"""What one engine step reports, for a sequence decoded here and for a prefill-only one."""

from __future__ import annotations

from disagg.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence, SequenceStatus
from tests.helpers import random_prompts, tiny_loaded


def make_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(block_size=4, num_kv_blocks=64), loaded=tiny_loaded())


def test_a_step_lists_prefilled_decoded_and_finished_sequences():
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    seq = engine.add_request(random_prompts(1, [9])[0], params)
    first = engine.step()
    assert first.prefilled == [seq] and not first.decoded and not first.finished
    second = engine.step()
    assert second.decoded == [seq] and second.finished == [seq] and seq.is_finished
    assert engine.step().is_idle


def test_a_prefill_only_sequence_leaves_with_its_blocks():
    engine = make_engine()
    seq = Sequence(random_prompts(1, [9])[0], SamplingParams(temperature=0, max_tokens=1))
    seq.is_prefill_only = True
    engine.add_sequence(seq)
    output = engine.step()
    assert output.prefilled == [seq] and not output.finished
    assert seq.status == SequenceStatus.PREFILLED and seq.finish_reason == "length"
    assert len(seq.block_table) == 3 and not engine.has_unfinished
    assert not engine.abort_sequence(seq)  # no longer the engine's
    engine.block_manager.release(seq)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_failing_step_reports_its_sequences_instead_of_raising():
    engine = make_engine()
    seq = engine.add_request(random_prompts(1, [5])[0], SamplingParams(max_tokens=3))

    def broken(chunks, on_layer):
        raise RuntimeError("boom")

    engine.runner.prefill = broken
    output = engine.step()
    assert output.failed == [seq] and str(output.error) == "boom"
    assert seq.finish_reason == "error" and not engine.has_unfinished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
