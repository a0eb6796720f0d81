"""What one preemption costs: recompute the sequence's KV, or swap its blocks to host and back.

vLLM offers both (Kwon et al., SOSP 2023, section 4.5): recompute frees the
blocks and, on resume, prefills prompt + output again; swap copies the blocks
to host memory and back into fresh blocks. The scheduler here recomputes
(disagg/engine/scheduler.py); this measures the other side of that choice.

For each context length, on the same engine and pool, interleaved round by round
so a busy machine slows both alike:
- recompute: prefill that many tokens into the paged cache through the engine's
  runner, in chunks of `max_num_batched_tokens` as the scheduler would;
- swap: every layer's K and V blocks of those tokens copied out of the pool into
  a host buffer (pinned where the pool is on CUDA), then back into other blocks.

On a CPU-only server the host buffer is the same DRAM as the pool: swap space
is memory the pool could have had instead.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.scheduler import ScheduledChunk
from disagg.engine.sequence import Sequence
from disagg.kv.cache import PagedKVCache
from disagg.model.loader import LoadedModel


@dataclass
class HostSwapSpace:
    """Host copies of a run of blocks, every layer: [num_layers, num_blocks, B, Hkv, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def for_blocks(cls, kv_cache: PagedKVCache, num_blocks: int) -> HostSwapSpace:
        layout = kv_cache.layout
        shape = (layout.num_layers, num_blocks, layout.block_size,
                 layout.num_kv_heads, layout.head_dim)  # fmt: skip
        pin = kv_cache.k[0].device.type == "cuda"
        return cls(*(torch.empty(shape, dtype=layout.dtype, pin_memory=pin) for _ in range(2)))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def swap_out(kv_cache: PagedKVCache, block_ids: torch.Tensor, host: HostSwapSpace) -> None:
    """Every layer's K and V of `block_ids` ([nb], on the pool's device) into `host`."""
    on_host = kv_cache.k[0].device.type == "cpu"
    for layer in range(kv_cache.layout.num_layers):
        for pool, dst in ((kv_cache.k[layer], host.k[layer]), (kv_cache.v[layer], host.v[layer])):
            if on_host:  # NOTE: straight into the buffer, no intermediate copy
                torch.index_select(pool, 0, block_ids, out=dst)
            else:
                dst.copy_(pool.index_select(0, block_ids), non_blocking=True)


def swap_in(kv_cache: PagedKVCache, block_ids: torch.Tensor, host: HostSwapSpace) -> None:
    """`host` back into the pool's blocks `block_ids` ([nb]), every layer, K and V."""
    device = block_ids.device
    for layer in range(kv_cache.layout.num_layers):
        for pool, src in ((kv_cache.k[layer], host.k[layer]), (kv_cache.v[layer], host.v[layer])):
            pool.index_copy_(0, block_ids, src.to(device, non_blocking=True))


def recompute(engine: LLMEngine, token_ids: list[int], block_ids: list[int]) -> None:
    """Prefill `token_ids` into `block_ids` through the engine's runner, chunk by chunk."""
    params = SamplingParams(temperature=0, max_tokens=1)
    seq = Sequence(list(token_ids), params, block_table=block_ids, owns_blocks=False)
    budget = engine.config.max_num_batched_tokens
    while seq.num_uncomputed_tokens:
        chunk = ScheduledChunk(seq, min(budget, seq.num_uncomputed_tokens))
        engine.runner.prefill([chunk])
        seq.num_computed_tokens += chunk.num_tokens


def time_context(engine: LLMEngine, token_ids: list[int], repeats: int) -> dict:
    """Median ms of recompute, swap out and swap in for one context, interleaved."""
    manager, kv_cache = engine.block_manager, engine.kv_cache
    num_blocks = manager.blocks_for(len(token_ids))
    blocks, resumed = manager.allocate(num_blocks), manager.allocate(num_blocks)
    device = kv_cache.k[0].device
    block_ids = torch.tensor(blocks, device=device)
    resumed_ids = torch.tensor(resumed, device=device)
    host = HostSwapSpace.for_blocks(kv_cache, num_blocks)
    times: dict[str, list[float]] = {"recompute": [], "swap_out": [], "swap_in": []}
    steps = {
        "recompute": lambda: recompute(engine, token_ids, blocks),
        "swap_out": lambda: swap_out(kv_cache, block_ids, host),
        "swap_in": lambda: swap_in(kv_cache, resumed_ids, host),
    }
    try:
        for round_index in range(repeats + 1):  # the first round warms up
            for name, step in steps.items():
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                if round_index:
                    times[name].append(time.perf_counter() - start)
        assert_swapped_back(kv_cache, block_ids, resumed_ids)
    finally:
        manager.free(blocks + resumed)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    ms["swap"] = ms["swap_out"] + ms["swap_in"]
    return {"num_tokens": len(token_ids), "swap_nbytes": host.nbytes, "ms": ms,
            "recompute_over_swap": ms["recompute"] / ms["swap"]}  # fmt: skip


def assert_swapped_back(kv_cache: PagedKVCache, block_ids: torch.Tensor, resumed: torch.Tensor):
    """The blocks swapped in hold what was swapped out: the copy timed is the real one."""
    for layer in (0, kv_cache.layout.num_layers - 1):
        for pool in (kv_cache.k[layer], kv_cache.v[layer]):
            if not torch.equal(pool.index_select(0, block_ids), pool.index_select(0, resumed)):
                raise AssertionError(f"layer {layer}: swapped-in blocks differ from the originals")


def bench_preemption(
    loaded: LoadedModel,
    contexts: list[int],
    repeats: int,
    device: str,
    seed: int = 0,
    num_kv_blocks: int | None = None,
) -> dict:
    """Recompute against swap at each context length, on one engine (the default pool
    unless `num_kv_blocks` is given; it must hold two of the longest context)."""
    engine = LLMEngine(EngineConfig(device=device, num_kv_blocks=num_kv_blocks), loaded=loaded)
    layout = engine.kv_cache.layout
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model.lm_head.out_features
    runs = []
    for num_tokens in contexts:
        token_ids = torch.randint(0, vocab, (num_tokens,), generator=generator).tolist()
        runs.append(time_context(engine, token_ids, repeats))
    return {
        "device": device,
        "bytes_per_token": layout.num_layers * layout.bytes_per_token_per_layer,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "runs": runs,
    }


def print_preemption(result: dict, dtype: str) -> None:
    print(f"\n== {dtype} on {result['device']}: one preemption, recompute vs swap to host "
          f"and back; KV {result['bytes_per_token'] / 1024:.1f} KiB per token ==")  # fmt: skip
    print(f"{'tokens':>7}{'KV MB':>9}{'recompute ms':>14}{'swap out':>10}{'swap in':>9}"
          f"{'swap ms':>9}{'recompute/swap':>16}")  # fmt: skip
    for run in result["runs"]:
        ms = run["ms"]
        print(f"{run['num_tokens']:>7}{run['swap_nbytes'] / 1e6:>9.1f}{ms['recompute']:>14.1f}"
              f"{ms['swap_out']:>10.2f}{ms['swap_in']:>9.2f}{ms['swap']:>9.2f}"
              f"{run['recompute_over_swap']:>15.1f}x")  # fmt: skip
