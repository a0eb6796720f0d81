"""The scheduler is pure: these tests build real sequences and a real block manager, no model."""

from __future__ import annotations

from disagg.engine.sampling_params import SamplingParams
from disagg.engine.scheduler import Scheduler, SchedulerConfig
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.kv.block_manager import BlockManager


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 32,
    max_seqs: int = 8,
    watermark_fraction: float = 0.0,
    interleave: int = 0,
) -> Scheduler:
    """`interleave` 0 (prefill first) unless a test is about interleaving."""
    manager = BlockManager(num_blocks, block_size=4, watermark_fraction=watermark_fraction)
    return Scheduler(SchedulerConfig(max_seqs, budget, interleave), manager)


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


def decode_one(scheduler: Scheduler, token_id: int = 3) -> list[Sequence]:
    """A decode step as the engine runs it: the last token's K/V computed, a new token."""
    decoded = scheduler.schedule().decode
    for seq in decoded:
        seq.num_computed_tokens += 1
        seq.output_token_ids.append(token_id)
    return decoded


def test_a_decoding_sequence_takes_one_block_when_its_last_one_fills():
    scheduler = make_scheduler(num_blocks=8)
    seq = make_seq(4)  # exactly one full block
    scheduler.add(seq)
    run_prefill(scheduler)
    seq.output_token_ids.append(3)
    assert len(seq.block_table) == 1
    decode_one(scheduler)  # computes position 4: a second block
    assert len(seq.block_table) == 2
    for _ in range(3):  # positions 5..7 fit the second block
        decode_one(scheduler)
    assert len(seq.block_table) == 2
    decode_one(scheduler)  # position 8: a third
    assert len(seq.block_table) == 3


def test_preempted_sequences_resume_oldest_first_by_recomputing_every_token():
    scheduler = make_scheduler(num_blocks=8, budget=64)
    seqs = [make_seq(8) for _ in range(4)]  # 2 blocks each: the pool is full
    for seq in seqs:
        scheduler.add(seq)
    run_prefill(scheduler)
    for seq in seqs:
        seq.output_token_ids.append(3)
    s0, s1, s2, s3 = seqs
    # position 8 needs a third block each: the youngest give theirs to the oldest
    assert decode_one(scheduler) == [s0, s1]
    assert list(scheduler.waiting) == [s2, s3]
    assert scheduler.num_preemptions == 2
    assert s3.block_table == [] and s3.num_computed_tokens == 0
    assert s3.status == SequenceStatus.WAITING
    assert scheduler.block_manager.num_free_blocks == 2  # s2 gave its own back
    assert scheduler.has_preempted  # a decode worker admits nothing new meanwhile
    assert run_prefill(scheduler) == []  # s2 needs 3 to resume
    scheduler.finish(s0, "stop")
    # room for s2's 9 tokens (3 blocks): prefilled again, prompt and output alike
    chunks = run_prefill(scheduler)
    assert [(c.seq, c.num_tokens) for c in chunks] == [(s2, 9)]
    assert s2.status == SequenceStatus.RUNNING and s2.num_computed_tokens == 9
    assert list(scheduler.waiting) == [s3]
    scheduler.finish(s1, "stop")
    assert [(c.seq, c.num_tokens) for c in run_prefill(scheduler)] == [(s3, 9)]
    assert not scheduler.has_preempted


def test_a_sequence_preempts_itself_when_it_is_the_only_one_that_could_give():
    scheduler = make_scheduler(num_blocks=3, budget=64)
    holder, seq = make_seq(4), make_seq(8)
    scheduler.add(holder)
    scheduler.add(seq)
    run_prefill(scheduler)
    scheduler.running.remove(holder)  # blocks held outside the batch (e.g. a KV handle)
    seq.output_token_ids.append(3)
    assert decode_one(scheduler) == []
    assert list(scheduler.waiting) == [seq] and seq.block_table == []
    scheduler.block_manager.release(holder)
    assert [(c.seq, c.num_tokens) for c in run_prefill(scheduler)] == [(seq, 9)]


def test_new_sequences_are_admitted_only_above_the_watermark_but_an_empty_pool_takes_any():
    scheduler = make_scheduler(num_blocks=10, budget=64, watermark_fraction=0.2)  # 2 kept
    assert scheduler.block_manager.watermark_blocks == 2
    alone = make_seq(40)  # the whole pool
    scheduler.add(alone)
    assert [c.seq for c in run_prefill(scheduler)] == [alone]
    scheduler.finish(alone, "stop")
    first, second = make_seq(24), make_seq(8)  # 6 blocks, then 2 (8 free after the first)
    scheduler.add(first)
    scheduler.add(second)
    assert [c.seq for c in run_prefill(scheduler)] == [first, second]
    third = make_seq(4)  # 1 block would leave 1 < 2 free: waits
    scheduler.add(third)
    assert run_prefill(scheduler) == []
    assert third.block_table == []
    scheduler.finish(second, "stop")
    assert [c.seq for c in run_prefill(scheduler)] == [third]


def test_a_chunked_prompt_holds_all_its_blocks_from_its_first_chunk():
    scheduler = make_scheduler(num_blocks=16, budget=8)
    seq = make_seq(30)
    scheduler.add(seq)
    chunks = run_prefill(scheduler)
    assert [c.num_tokens for c in chunks] == [8]
    assert len(seq.block_table) == 8  # 30 tokens: decoding cannot take them meanwhile


def test_with_sequences_decoding_prefill_steps_shrink_and_alternate_with_decode_steps():
    scheduler = make_scheduler(budget=32, interleave=8)
    running = make_seq(5)
    scheduler.add(running)
    assert [(c.seq, c.num_tokens) for c in run_prefill(scheduler)] == [(running, 5)]
    running.output_token_ids.append(7)
    long = make_seq(20)
    scheduler.add(long)
    kinds = []
    for _ in range(7):
        output = scheduler.schedule()
        for chunk in output.prefill:
            scheduler.on_prefilled(chunk)
        for seq in output.decode:
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(7)
        kinds.append([c.num_tokens for c in output.prefill] or f"decode {len(output.decode)}")
    # a decode step after the first prompt's prefill, then the 20 prompt tokens in chunks
    # of 8 with a decode step after each; then both decode
    assert kinds == ["decode 1", [8], "decode 1", [8], "decode 1", [4], "decode 2"]


def test_without_sequences_decoding_a_prefill_step_takes_the_whole_budget():
    scheduler = make_scheduler(budget=32, interleave=8)
    first, second = make_seq(20), make_seq(10)
    scheduler.add(first)
    scheduler.add(second)
    assert [c.num_tokens for c in run_prefill(scheduler)] == [20, 10]
