"""Building blocks shared by the tests: tiny random models and the transformers reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from disagg import tracing
from disagg.model.loader import LoadedModel

TINY_VOCAB = 512


def tiny_config(kind: str = "llama", **overrides: object):
    """A few-layer random model of the given Llama-family kind."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=0,
    )
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
        return LlamaConfig(rope_parameters=rope, tie_word_embeddings=False, **common)
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def tiny_loaded(kind: str = "llama", seed: int = 0, **overrides: object) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    if kind == "qwen2":  # random biases, so the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.3)
    model.eval()
    tokenizer = SimpleNamespace(eos_token_id=model.config.eos_token_id)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{kind}", path=Path("."))


def reference_tokens(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What transformers' own greedy generate produces: the ground truth."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def random_prompts(num: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, TINY_VOCAB, (lengths[i % len(lengths)],), generator=gen).tolist()
        for i in range(num)
    ]


def reference_text(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> str:
    """transformers' greedy continuation as the text a server returns (special tokens dropped)."""
    tokens = reference_tokens(loaded.model, prompt_ids, max_new_tokens)
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


@contextlib.contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Install a tracer provider whose finished spans collect in the exporter yielded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()
