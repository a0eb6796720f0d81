"""The engine loop's races, on a tiny model in this process: aborts, failures, wake-ups."""

from __future__ import annotations

import threading
import time

from disagg.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.engine.worker_loop import Abort, Admit, EngineLoop, SequenceListener, Wake
from tests.helpers import random_prompts, tiny_loaded

GREEDY = SamplingParams(temperature=0, max_tokens=4)


class Recorder(SequenceListener):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.done = threading.Event()
        self.prefilled = threading.Event()

    def on_prefilled(self, seq: Sequence) -> None:
        self.events.append("prefilled")
        self.prefilled.set()

    def on_token(self, seq: Sequence) -> None:
        self.events.append("token")

    def on_finished(self, seq: Sequence) -> None:
        self.events.append(f"finished:{seq.finish_reason}")
        self.done.set()

    def on_error(self, seq: Sequence, error: Exception) -> None:
        self.events.append(f"error:{error}")
        self.done.set()


def make_loop(num_kv_blocks: int = 64, tick_s: float = 0.05) -> EngineLoop:
    config = EngineConfig(block_size=4, num_kv_blocks=num_kv_blocks)
    loop = EngineLoop(LLMEngine(config, loaded=tiny_loaded()), tick_s=tick_s)
    loop.start()
    return loop


def all_free(loop: EngineLoop) -> bool:
    manager = loop.engine.block_manager
    return manager.num_free_blocks == manager.num_blocks and loop.num_sequences == 0


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_sequence_decodes_to_its_end_and_its_listener_hears_each_token():
    loop = make_loop()
    try:
        seq, recorder = Sequence(random_prompts(1, [7])[0], GREEDY), Recorder()
        loop.submit(Admit(seq, recorder))
        assert recorder.done.wait(10)
        assert recorder.events == ["token"] * 4 + ["finished:length"]
        loop.submit(Abort(seq))  # too late: nothing more is heard
        wait_until(lambda: all_free(loop))
        assert recorder.events[-1] == "finished:length" and len(recorder.events) == 5
    finally:
        loop.stop()


def test_an_abort_right_after_admit_frees_everything():
    loop = make_loop()
    try:
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        seq, recorder = Sequence(random_prompts(1, [30])[0], long), Recorder()
        loop.submit(Admit(seq, recorder))
        loop.submit(Abort(seq))
        assert recorder.done.wait(10)
        assert recorder.events[-1] == "finished:abort"
        wait_until(lambda: all_free(loop))
    finally:
        loop.stop()


def test_a_failing_step_fails_its_sequences_and_the_loop_goes_on():
    loop = make_loop()
    try:
        real_decode = loop.engine.runner.decode
        calls = []

        def failing_once(seqs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return real_decode(seqs)

        loop.engine.runner.decode = failing_once
        broken, recorder = Sequence(random_prompts(1, [5])[0], GREEDY), Recorder()
        loop.submit(Admit(broken, recorder))
        assert recorder.done.wait(10)
        assert recorder.events == ["token", "error:device lost"]
        assert broken.finish_reason == "error"
        fine, after = Sequence(random_prompts(1, [5])[0], GREEDY), Recorder()
        loop.submit(Admit(fine, after))
        assert after.done.wait(10) and after.events[-1] == "finished:length"
        wait_until(lambda: all_free(loop))
    finally:
        loop.stop()


def test_a_prompt_waiting_for_blocks_runs_as_soon_as_a_wake_says_they_are_free():
    loop = make_loop(num_kv_blocks=8, tick_s=30.0)  # only a Wake can end the idle wait soon
    try:
        holder, first = Sequence([3] * 32, GREEDY, is_prefill_only=True), Recorder()
        loop.submit(Admit(holder, first))
        assert first.prefilled.wait(10)
        assert holder.status == SequenceStatus.PREFILLED and holder.block_table
        waiting, second = Sequence([4] * 8, GREEDY, is_prefill_only=True), Recorder()
        loop.submit(Admit(waiting, second))
        assert not second.prefilled.wait(0.3), "no block is free yet"
        loop.engine.block_manager.release(holder)  # as the KV-send completion thread does
        start = time.monotonic()
        loop.submit(Wake())
        assert second.prefilled.wait(10) and time.monotonic() - start < 5
        loop.engine.block_manager.release(waiting)
        wait_until(lambda: all_free(loop))
    finally:
        loop.stop()


def test_the_progress_counter_counts_steps_that_computed_and_not_those_without_room():
    loop = make_loop(num_kv_blocks=8, tick_s=0.02)  # a step looks again every tick
    try:
        holder, first = Sequence([3] * 32, GREEDY, is_prefill_only=True), Recorder()
        loop.submit(Admit(holder, first))
        assert first.prefilled.wait(10)
        assert loop.num_busy_steps == 1, "one prefill step"
        waiting, second = Sequence([4] * 8, GREEDY, is_prefill_only=True), Recorder()
        loop.submit(Admit(waiting, second))
        num_steps = loop.num_steps
        wait_until(lambda: loop.num_steps >= num_steps + 3)  # looking, finding no room
        assert loop.num_busy_steps == 1, "a step without room is no progress"
        loop.engine.block_manager.release(holder)
        loop.submit(Wake())
        assert second.prefilled.wait(10)
        assert loop.num_busy_steps == 2
        loop.engine.block_manager.release(waiting)
        wait_until(lambda: all_free(loop))
    finally:
        loop.stop()


def test_a_step_in_progress_reports_how_long_it_has_run():
    loop = make_loop()
    try:
        real_decode, inside, release = (
            loop.engine.runner.decode,
            threading.Event(),
            threading.Event(),
        )

        def slow_decode(seqs):
            inside.set()
            release.wait(10)
            return real_decode(seqs)

        loop.engine.runner.decode = slow_decode
        seq, recorder = Sequence(random_prompts(1, [5])[0], GREEDY), Recorder()
        assert loop.step_running_s == 0.0, "no step yet"
        loop.submit(Admit(seq, recorder))
        assert inside.wait(10)
        wait_until(lambda: loop.step_running_s >= 0.05)  # one step, still running
        num_busy_steps = loop.num_busy_steps
        loop.engine.runner.decode = real_decode
        release.set()
        assert recorder.done.wait(10)
        assert loop.num_busy_steps > num_busy_steps and loop.step_running_s == 0.0
        wait_until(lambda: all_free(loop))
    finally:
        loop.stop()
