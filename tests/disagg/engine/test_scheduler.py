"""The scheduler is pure: these tests build real sequences and a real block manager, no model."""

from __future__ import annotations

from disagg.engine.sampling_params import SamplingParams
from disagg.engine.scheduler import Scheduler, SchedulerConfig
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.kv.block_manager import BlockManager


def make_scheduler(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), BlockManager(num_blocks, block_size=4))


def make_seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(num_tokens)), SamplingParams(temperature=0, max_tokens=100))


def run_prefill(scheduler: Scheduler) -> list:
    output = scheduler.schedule()
    for chunk in output.prefill:
        scheduler.on_prefilled(chunk)
    return output.prefill


def test_prefill_packs_prompts_up_to_the_token_budget_and_chunks_the_rest():
    scheduler = make_scheduler(budget=32)
    a, b = make_seq(20), make_seq(30)
    scheduler.add(a)
    scheduler.add(b)
    chunks = run_prefill(scheduler)
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 20), (b, 12)]
    assert a.status == SequenceStatus.RUNNING and b.status == SequenceStatus.WAITING
    assert b.num_computed_tokens == 12
    chunks = run_prefill(scheduler)
    assert [(c.seq, c.num_tokens) for c in chunks] == [(b, 18)]
    assert b.status == SequenceStatus.RUNNING


def test_decode_runs_every_running_sequence_when_nothing_waits():
    scheduler = make_scheduler()
    seqs = [make_seq(5) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run_prefill(scheduler)
    for seq in seqs:
        seq.output_token_ids.append(7)
    output = scheduler.schedule()
    assert output.prefill == [] and output.decode == seqs


def test_decode_preempts_the_newest_sequence_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=4, budget=64)
    old, new = make_seq(8), make_seq(8)
    scheduler.add(old)
    scheduler.add(new)
    run_prefill(scheduler)
    assert scheduler.block_manager.num_free_blocks == 0
    old.output_token_ids.append(3)
    new.output_token_ids.append(3)
    old.num_computed_tokens = new.num_computed_tokens = 8
    output = scheduler.schedule()
    assert output.decode == [old]
    assert new.status == SequenceStatus.WAITING and new.block_table == []
    assert list(scheduler.waiting) == [new]


def test_max_num_seqs_caps_admission():
    scheduler = make_scheduler(max_seqs=2)
    for _ in range(3):
        scheduler.add(make_seq(4))
    chunks = run_prefill(scheduler)
    assert len(chunks) == 2 and len(scheduler.waiting) == 1


def test_finish_and_abort_free_blocks_wherever_the_sequence_is():
    scheduler = make_scheduler(budget=8)
    running, partial = make_seq(4), make_seq(20)
    scheduler.add(running)
    scheduler.add(partial)
    run_prefill(scheduler)
    assert partial.status == SequenceStatus.WAITING and partial.block_table
    scheduler.abort(partial.request_id)
    scheduler.finish(running, "stop")
    assert not scheduler.has_unfinished
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert partial.finish_reason == "abort" and running.finish_reason == "stop"
