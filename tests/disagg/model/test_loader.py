from __future__ import annotations

import json
import os

import pytest
import torch

from disagg.errors import InvalidRequestError, UnsupportedModelError
from disagg.model.device import resolve_device, resolve_dtype
from disagg.model.loader import convert_gguf, default_model_path, load_model, resolve_model_path
from tests.helpers import tiny_loaded


def test_default_resolves_to_the_packaged_gguf():
    path, name = resolve_model_path("default")
    assert path == default_model_path() and path.suffix == ".gguf" and path.exists()
    assert name == "SmolLM2-135M-Instruct"


def test_gguf_conversion_is_cached_and_reused(default_fp32):
    target = convert_gguf(default_model_path())
    weights = target / "model.safetensors"
    mtime = os.stat(weights).st_mtime_ns
    assert convert_gguf(default_model_path()) == target
    assert os.stat(weights).st_mtime_ns == mtime, "a second load must not convert again"


def test_hf_directory_loads_with_its_tokenizer(tmp_path, default_fp32):
    loaded = tiny_loaded("qwen2")
    loaded.model.save_pretrained(tmp_path)
    default_fp32.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    assert type(again.model).__name__ == "Qwen2ForCausalLM"
    assert again.name == tmp_path.name
    for ours, theirs in zip(again.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(ours, theirs)


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UnsupportedModelError) as info:
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    assert "GPT2LMHeadModel" in str(info.value) and "LlamaForCausalLM" in str(info.value)


@pytest.mark.parametrize("model", ["/no/such/model", "README.md"])
def test_missing_or_unrecognised_paths_are_clear_errors(model):
    with pytest.raises(UnsupportedModelError):
        resolve_model_path(model)


def test_dtype_and_device_resolution():
    cpu = resolve_device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(InvalidRequestError):
        resolve_dtype("int3", cpu)
    with pytest.raises(InvalidRequestError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError):
            resolve_device("cuda:0")
