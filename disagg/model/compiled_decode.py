"""The decode forward through `torch.compile` (inductor), opt-in with `--compile`.

Why: a decode step at small batch is ~30 layers of ~20 small operators (norms,
RoPE, SiLU·up, residuals) around a few matmuls, and eagerly each operator pays
its dispatch. Inductor fuses the elementwise ones into a few C++ loops and
leaves the matmuls to the same kernels the eager path picks (the packed oneDNN
linear enters the graph as the opaque `disagg::packed_linear` op).

Shapes: the batch and context dimensions are dynamic, so one graph serves
every batch size and context length, except that a batch of at most
`GEMV_MAX_ROWS` rows takes another matmul kernel: two graphs in all, both
compiled at start-up (`warm_up`), before the worker registers. Dynamo
specializes sizes 0 and 1, and an input that is None, so the runner keeps
every dynamic size at MIN_DYNAMIC_SIZE or more and always passes the key bias;
otherwise a lone stream, a short context or a context at a block boundary
would each compile a graph of its own, mid-request.

Caches: inductor's FX-graph and code caches live under `<cache root>/inductor`
(`DISAGG_CACHE_DIR`, default `~/.cache/disagg`), so a restart loads the graphs
instead of compiling them again.

Cost: compiling needs a C++ compiler and takes minutes per graph on a small
CPU; without one the engine runs eagerly and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config

from disagg.model.llama import LlamaModel
from disagg.model.loader import cache_root

log = logging.getLogger(__name__)

MIN_DYNAMIC_SIZE = 2
"""Smallest batch and block-table width a compiled step is given (sizes 0 and 1 are
specialized by dynamo)."""


def inductor_cache_dir() -> Path:
    return cache_root() / "inductor"


def has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def compile_decode(model: LlamaModel) -> Callable[..., torch.Tensor] | None:
    """The model's forward compiled for decode batches; None (with a warning) where
    compiling cannot work here, so the caller keeps the eager forward."""
    if model.device.type == "cpu" and not has_cxx_compiler():
        log.warning("--compile: no C++ compiler (g++/c++/clang++) found; decoding eagerly")
        return None
    cache_dir = inductor_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: inductor reads its cache directory from the environment only.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    # NOTE: without this, a batch as wide as its block tables (2 and 2) compiles a graph
    # in which the two sizes are one symbol, and the next step recompiles.
    fx_config.use_duck_shape = False
    return torch.compile(model.forward_step, dynamic=True)
