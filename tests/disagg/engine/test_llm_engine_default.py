"""The real default model: our engine against transformers, token for token."""

from __future__ import annotations

import pytest
import torch

import disagg.model.runner
from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.model.loader import load_model
from disagg.model.tokenizer import apply_chat_template
from tests.helpers import reference_tokens

NEW_TOKENS = 32
LOGIT_ATOL = 2e-3
"""float32 prefill logits (magnitude ~10-30) agree with transformers to this absolute tolerance."""
BF16_TIE_MARGIN = 0.25
"""In bfloat16 a divergence is allowed only where transformers' own top-2 logits are this close."""

TEXTS = [
    "The capital of France is",
    "def quicksort(arr):\n    ",
    "Photosynthesis is the process by which",
    "Le chat est assis sur le tapis, et",
    "東京は日本の首都で、",
    "Los tres mejores consejos para aprender un idioma son",
    "SELECT name, COUNT(*) FROM orders",
    "1, 1, 2, 3, 5, 8, 13,",
    "Q: Why is the sky blue?\nA:",
]
LONG_TEXT = " ".join(
    f"Section {i}: the committee reviewed item {i * 7} and noted a variance of {i % 13} percent."
    for i in range(70)
)
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def prompts(default_fp32) -> list[list[int]]:
    tok = default_fp32.tokenizer
    ids = [tok(text)["input_ids"] for text in [*TEXTS, LONG_TEXT]]
    ids.append(apply_chat_template(tok, CHAT))
    assert len(ids[-2]) >= 1000, "the long prompt must be at least 1000 tokens"
    return ids


@pytest.fixture(scope="module")
def references(default_fp32, prompts) -> list[list[int]]:
    return [reference_tokens(default_fp32.model, p, NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def engine(default_fp32) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", max_num_batched_tokens=512), loaded=default_fp32)


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_one_by_one_equals_transformers(engine, prompts, references):
    for prompt, expected in zip(prompts, references):
        (seq,) = engine.generate([prompt], GREEDY)
        assert seq.output_token_ids == expected
    assert_idle(engine)


def test_continuous_batch_with_staggered_arrivals_equals_transformers(engine, prompts, references):
    seqs = []
    for prompt in prompts:
        seqs.append(engine.add_request(prompt, GREEDY))
        engine.step()
        engine.step()
    while engine.has_unfinished:
        engine.step()
    assert [seq.output_token_ids for seq in seqs] == references
    assert_idle(engine)


def test_prefill_logits_match_transformers(engine, prompts, monkeypatch):
    captured = []
    real_sample = disagg.model.runner.sample
    monkeypatch.setattr(
        disagg.model.runner,
        "sample",
        lambda logits, seqs: captured.append(logits.clone()) or real_sample(logits, seqs),
    )
    batch = [prompts[0], prompts[3], prompts[9]]
    engine.generate(batch, SamplingParams(temperature=0, max_tokens=1))
    ours = torch.cat(captured)
    with torch.inference_mode():
        expected = torch.stack(
            [engine.loaded.model(torch.tensor([p])).logits[0, -1] for p in batch]
        )
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < LOGIT_ATOL


def test_chat_answers_paris(engine):
    tok = engine.tokenizer
    ids = apply_chat_template(tok, [{"role": "user", "content": "What is the capital of France?"}])
    (seq,) = engine.generate([ids], SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in tok.decode(seq.output_token_ids, skip_special_tokens=True)


def test_bfloat16_diverges_only_at_near_ties(prompts):
    loaded = load_model("default", torch.bfloat16, torch.device("cpu"))
    engine = LLMEngine(EngineConfig(dtype="bfloat16"), loaded=loaded)
    subset = [prompts[i] for i in (0, 1, 4, 8)]
    seqs = engine.generate(subset, SamplingParams(temperature=0, max_tokens=16))
    for prompt, seq in zip(subset, seqs):
        expected = reference_tokens(loaded.model, prompt, 16)
        ours = seq.output_token_ids
        diverged = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        if diverged is None:
            assert ours == expected
            continue
        with torch.inference_mode():
            prefix = torch.tensor([prompt + expected[:diverged]])
            logits = loaded.model(prefix).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).item() <= BF16_TIE_MARGIN, (
            f"diverged at {diverged} without a tie"
        )
    assert_idle(engine)
