"""The compiled decode step (`--compile`) computes the tokens the eager one does."""

from __future__ import annotations

import logging

import pytest
from torch._dynamo.utils import counters

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.logs import PROGRESS_LOGGER
from disagg.model.compiled_decode import compile_decode, has_cxx_compiler, inductor_cache_dir
from disagg.model.tokenizer import apply_chat_template
from tests.helpers import random_prompts, reference_tokens, tiny_loaded


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    return tmp_path


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor needs a C++ compiler")
def test_compiled_decode_equals_transformers_alone_and_batched(isolated_cache, caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    config = EngineConfig(block_size=4, num_kv_blocks=512, max_num_batched_tokens=256, compile=True)
    engine = LLMEngine(config, loaded=tiny_loaded("llama"))
    assert engine.runner.compiled_decode is not None
    cache_dir = isolated_cache / "inductor"
    assert inductor_cache_dir() == cache_dir
    assert any(cache_dir.iterdir()), "start-up compiled into the project's cache"
    progress = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert len(progress) == 4 and all("ready in" in line for line in progress[1::2])
    graphs_at_start = compiled_graphs()
    params = SamplingParams(temperature=0, max_tokens=16)
    # one to five rows, contexts from 4 to 82 tokens: across every block boundary
    prompts = random_prompts(5, [3, 17, 40, 9, 66], seed=4)
    expected = [reference_tokens(engine.loaded.model, p, 16) for p in prompts]
    for count in range(1, len(prompts) + 1):
        batch = engine.generate(prompts[:count], params)
        assert [seq.output_token_ids for seq in batch] == expected[:count]
    assert compiled_graphs() == graphs_at_start, "a step compiled after start-up"
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor needs a C++ compiler")
def test_compiled_decode_on_the_real_model_equals_transformers(default_fp32):
    """The serving model itself through the compiled step, alone and two rows at once.

    Both run as two rows (a lone one is padded to two), so this compiles, or loads
    from the project's cache, one graph: the one a lone stream runs. The tiny model
    above covers the other.
    """
    engine = LLMEngine(
        EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256), loaded=default_fp32
    )
    engine.runner.compiled_decode = compile_decode(engine.model)
    assert engine.runner.compiled_decode is not None
    graphs_before = compiled_graphs()
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    prompts = [
        apply_chat_template(default_fp32.tokenizer, [{"role": "user", "content": text}])
        for text in questions
    ]
    params = SamplingParams(temperature=0, max_tokens=24)
    alone = engine.generate(prompts[:1], params)
    together = engine.generate(prompts, params)
    expected = [reference_tokens(default_fp32.model, prompt, 24) for prompt in prompts]
    assert alone[0].output_token_ids == expected[0]
    assert [seq.output_token_ids for seq in together] == expected
    assert compiled_graphs() == graphs_before + 1, "one graph served both"
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_without_a_cxx_compiler_the_engine_decodes_eagerly_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr("disagg.model.compiled_decode.has_cxx_compiler", lambda: False)
    config = EngineConfig(block_size=4, num_kv_blocks=64, compile=True)
    engine = LLMEngine(config, loaded=tiny_loaded("llama"))
    assert engine.runner.compiled_decode is None
    assert "no C++ compiler" in caplog.text
    prompt = random_prompts(1, [7], seed=5)[0]
    (seq,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))
    assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 4)
