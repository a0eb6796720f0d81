"""The compiled decode step (`--compile`) computes the tokens the eager one does."""

from __future__ import annotations

import pytest

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.model.compiled_decode import has_cxx_compiler, inductor_cache_dir
from tests.helpers import random_prompts, reference_tokens, tiny_loaded


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    return tmp_path


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor needs a C++ compiler")
def test_compiled_decode_equals_transformers_alone_and_batched(isolated_cache):
    config = EngineConfig(block_size=4, num_kv_blocks=512, max_num_batched_tokens=256, compile=True)
    engine = LLMEngine(config, loaded=tiny_loaded("llama"))
    assert engine.runner.compiled_decode is not None
    cache_dir = isolated_cache / "inductor"
    assert inductor_cache_dir() == cache_dir
    assert any(cache_dir.iterdir()), "start-up compiled into the project's cache"
    params = SamplingParams(temperature=0, max_tokens=16)
    prompts = random_prompts(5, [3, 17, 40, 9, 66], seed=4)
    alone = engine.generate(prompts[:1], params)
    batched = engine.generate(prompts, params)
    expected = [reference_tokens(engine.loaded.model, p, 16) for p in prompts]
    assert alone[0].output_token_ids == expected[0]
    assert [seq.output_token_ids for seq in batched] == expected
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
