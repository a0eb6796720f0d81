"""Our own Llama-family forward over a packed batch and a paged KV cache.

Weights, RoPE tables (every rope_type transformers knows, llama3 scaling
included) and config come from the transformers model; the forward itself is
written here so that many sequences of different lengths share one pass, their
K/V living in the paged pool instead of a per-request dense cache. The
arithmetic mirrors transformers' op for op, so greedy tokens stay equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disagg.kv.cache import KVLayout, PagedKVCache
from disagg.model.paged_attention import DecodeKeys, decode_attention
from disagg.model.projection import Projection


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which keys each query may see."""

    slot_mapping: torch.Tensor
    """[T] flat cache slot of every token in the batch."""
    query_lens: list[int]
    """Per sequence: new tokens in this batch (1 for decode)."""
    context_blocks: list[torch.Tensor | None]
    """Prefill only, per sequence: [nb] block ids holding all its visible keys, or
    None when the chunk is the whole context (keys come straight from this forward)."""
    context_lens: list[int]
    """Prefill only, per sequence: visible keys (cached prefix plus this chunk)."""
    decode_keys: DecodeKeys | None = None
    """Decode only: block tables and padding mask of the batch."""

    @property
    def is_decode(self) -> bool:
        return self.decode_keys is not None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv_proj: Projection
    o_proj: Projection
    post_norm: torch.Tensor
    gate_up_proj: Projection
    down_proj: Projection


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers computes it: normalize in float32, scale in the model dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class RopeTables:
    """One step's RoPE factors, shaped once for every layer.

    `rotate_half(x) * sin` equals `roll(x, D/2) * signed_sin`, where signed_sin
    is sin with its first half negated: negation is exact, so the products, and
    the rotated Q/K, are bit for bit transformers', in two fewer operators.
    """

    cos: torch.Tensor
    """[T, 1, D]"""
    sin: torch.Tensor
    """[T, 1, D]"""
    signed_sin: torch.Tensor
    """[T, 1, D]"""

    @classmethod
    def build(cls, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        """cos, sin: [T, D] as the model's rotary embedding returns them."""
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cls(cos.unsqueeze(1), sin.unsqueeze(1), signed_sin.unsqueeze(1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D], any heads (Q and K together) -> rotated, [T, H, D]."""
        half = x.shape[-1] // 2
        rolled = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + rolled * self.signed_sin

    def apply_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """As transformers writes it (the measured baseline): x: [T, H, D]."""
        return x * self.cos + rotate_half(x) * self.sin


class LlamaModel:
    """Forward pass only; holds references to the transformers model's weights.

    `fast=True` (the serving path): Q/K/V and gate/up fused into one matmul each,
    decode attention reading whole blocks of the pool (`attention_method`, see
    paged_attention). `fast=False` runs every projection separately and gathers
    K/V slot by slot: the engine as it first was, kept as a measured baseline.
    """

    def __init__(
        self, hf_model: torch.nn.Module, fast: bool = True, attention_method: str = "auto"
    ) -> None:
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.embed_tokens = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        tied = hf_model.lm_head.weight is inner.embed_tokens.weight
        self.lm_head = Projection(
            [hf_model.lm_head], prepack=None if fast else False, repoint=not tied
        )
        self.dtype = self.embed_tokens.dtype
        self.device = self.embed_tokens.device
        self.fast = fast
        self.attention_method = attention_method if fast else "gather_slots"
        self.layers = [self._layer_weights(layer, fast) for layer in inner.layers]

    @staticmethod
    def _layer_weights(layer: torch.nn.Module, fast: bool) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv_proj=Projection([attn.q_proj, attn.k_proj, attn.v_proj], fused=fast),
            o_proj=Projection([attn.o_proj], prepack=None if fast else False),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up_proj=Projection([mlp.gate_proj, mlp.up_proj], fused=fast),
            down_proj=Projection([mlp.down_proj], prepack=None if fast else False),
        )

    def kv_layout(self, block_size: int) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.dtype)

    def forward_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
        logits_indices: torch.Tensor | None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; logits_indices: [B] rows that need logits, None for
        every row (decode). Returns float32 logits [B, V].

        `on_layer(i)` runs as soon as layer i's K/V are in the cache, so a caller
        can ship them while the next layer computes. This is `forward` without its
        inference-mode wrapper: what `torch.compile` traces (its caller is already in
        inference mode).
        """
        hidden = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))  # [1, T, D] each
        rope = RopeTables.build(cos[0], sin[0])
        for index, layer in enumerate(self.layers):
            normed = rms_norm(hidden, layer.input_norm, self.eps)
            hidden = hidden + self._attention(index, layer, normed, rope, meta, kv_cache)
            normed = rms_norm(hidden, layer.post_norm, self.eps)
            hidden = hidden + self._mlp(layer, normed)
            if on_layer is not None:
                on_layer(index)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        last = rms_norm(hidden, self.final_norm, self.eps)  # [B, hidden]
        return self.lm_head(last).float()

    forward = torch.inference_mode()(forward_step)
    """`forward_step` in inference mode: the eager entry point."""

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up_proj(x)
        return layer.down_proj(F.silu(gate) * up)

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        rope: RopeTables,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self._rotated_qkv(layer, x, rope)
        kv_cache.write(index, meta.slot_mapping, k, v)
        if meta.is_decode:
            out = decode_attention(
                q,
                kv_cache.k[index],
                kv_cache.v[index],
                meta.decode_keys,
                self.scale,
                self.attention_method,
            )
        else:
            out = self._prefill_attention(index, q, k, v, meta, kv_cache)
        return layer.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

    def _rotated_qkv(
        self, layer: LayerWeights, x: torch.Tensor, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q [T, Hq, D], k and v [T, Hkv, D]; q and k rotated.

        Fused: Q and K are adjacent columns of one matmul's output, so they are
        rotated as one [T, Hq + Hkv, D] tensor (q, k are views of it).
        """
        num_tokens, head_dim = x.shape[0], self.head_dim
        if layer.qkv_proj.fused:
            num_qk_heads = self.num_heads + self.num_kv_heads
            qkv = layer.qkv_proj.matmul(x)  # [T, (Hq + 2 Hkv) D]
            qk = qkv[:, : num_qk_heads * head_dim].view(num_tokens, num_qk_heads, head_dim)
            qk = rope.apply(qk)
            v = qkv[:, num_qk_heads * head_dim :].view(num_tokens, self.num_kv_heads, head_dim)
            return qk[:, : self.num_heads], qk[:, self.num_heads :], v
        q, k, v = layer.qkv_proj(x)
        q = q.reshape(num_tokens, self.num_heads, head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, head_dim)
        return rope.apply_unfused(q), rope.apply_unfused(k), v

    def _prefill_attention(
        self,
        index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """Each sequence attends causally to its own keys. q: [T, Hq, D] -> [T, Hq, D]."""
        outputs = []
        start = 0
        for query_len, blocks, context_len in zip(
            meta.query_lens, meta.context_blocks, meta.context_lens
        ):
            q_seq = q[start : start + query_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if blocks is None:
                k_seq, v_seq = k[start : start + query_len], v[start : start + query_len]
                out = self._sdpa_causal(q_seq, k_seq, v_seq)
            else:
                k_seq, v_seq = kv_cache.gather_blocks(index, blocks, context_len)  # [ctx, Hkv, D]
                out = self._sdpa_chunk(q_seq, k_seq, v_seq)
            outputs.append(out[0].transpose(0, 1))  # [n, Hq, D]
            start += query_len
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _sdpa_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A whole prompt: q [1, Hq, n, D]; k, v [n, Hkv, D]."""
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=q.shape[2] > 1, scale=self.scale, enable_gqa=True
        )

    def _sdpa_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A chunk after a cached prefix: q [1, Hq, n, D] at the end of k, v [ctx, Hkv, D]."""
        query_len, context_len = q.shape[2], k.shape[0]
        offset = context_len - query_len
        query_pos = torch.arange(query_len, device=q.device).unsqueeze(1) + offset
        key_pos = torch.arange(context_len, device=q.device).unsqueeze(0)
        mask = key_pos <= query_pos  # [n, ctx]
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
