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


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which keys each query may see."""

    slot_mapping: torch.Tensor
    """[T] flat cache slot of every token in the batch."""
    query_lens: list[int]
    """Per sequence: new tokens in this batch (1 for decode)."""
    context_slots: list[torch.Tensor | None]
    """Prefill only, per sequence: [ctx] slots of all visible keys, or None when
    the chunk is the whole context (keys come straight from this forward)."""
    decode_slots: torch.Tensor | None = None
    """Decode only: [B, Lmax] slots of each sequence's keys, padded."""
    decode_mask: torch.Tensor | None = None
    """Decode only: [B, 1, 1, Lmax] bool, True where a key is real; None if no padding."""

    @property
    def is_decode(self) -> bool:
        return self.decode_slots is not None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    o_proj: torch.nn.Linear
    post_norm: torch.Tensor
    gate_proj: torch.nn.Linear
    up_proj: torch.nn.Linear
    down_proj: torch.nn.Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers computes it: normalize in float32, scale in the model dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def linear(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, proj.weight, proj.bias)


class LlamaModel:
    """Forward pass only; holds references to the transformers model's weights."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
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
        self.lm_head = hf_model.lm_head.weight
        self.dtype = self.embed_tokens.dtype
        self.device = self.embed_tokens.device
        self.layers = [self._layer_weights(layer) for layer in inner.layers]

    @staticmethod
    def _layer_weights(layer: torch.nn.Module) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            post_norm=layer.post_attention_layernorm.weight,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
        )

    def kv_layout(self, block_size: int) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
        logits_indices: torch.Tensor,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; logits_indices: [B]. Returns float32 logits [B, V].

        `on_layer(i)` runs as soon as layer i's K/V are in the cache, so a caller
        can ship them while the next layer computes.
        """
        hidden = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))  # [1, T, D] each
        cos, sin = cos[0], sin[0]
        for index, layer in enumerate(self.layers):
            normed = rms_norm(hidden, layer.input_norm, self.eps)
            hidden = hidden + self._attention(index, layer, normed, cos, sin, meta, kv_cache)
            normed = rms_norm(hidden, layer.post_norm, self.eps)
            hidden = hidden + self._mlp(layer, normed)
            if on_layer is not None:
                on_layer(index)
        last = rms_norm(hidden[logits_indices], self.final_norm, self.eps)  # [B, hidden]
        return F.linear(last, self.lm_head).float()

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return linear(
            F.silu(linear(x, layer.gate_proj)) * linear(x, layer.up_proj), layer.down_proj
        )

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = linear(x, layer.q_proj).view(num_tokens, self.num_heads, self.head_dim)
        k = linear(x, layer.k_proj).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = linear(x, layer.v_proj).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_cache.write(index, meta.slot_mapping, k, v)
        if meta.is_decode:
            out = self._decode_attention(index, q, meta, kv_cache)
        else:
            out = self._prefill_attention(index, q, k, v, meta, kv_cache)
        return linear(out.reshape(num_tokens, self.num_heads * self.head_dim), layer.o_proj)

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
        for query_len, context_slots in zip(meta.query_lens, meta.context_slots):
            q_seq = q[start : start + query_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if context_slots is None:
                k_seq, v_seq = k[start : start + query_len], v[start : start + query_len]
                out = self._sdpa_causal(q_seq, k_seq, v_seq)
            else:
                k_seq, v_seq = kv_cache.gather(index, context_slots)  # [ctx, Hkv, D]
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

    def _decode_attention(
        self, index: int, q: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """One query per sequence. q: [B, Hq, D] -> [B, Hq, D].

        NOTE: the query heads that share a KV head are packed as that head's
        queries ([B, Hkv, groups, D]), as transformers does for one-token
        queries, so K/V are never repeated per query head.
        """
        batch = q.shape[0]
        groups = self.num_heads // self.num_kv_heads
        k, v = kv_cache.gather(index, meta.decode_slots)  # [B, L, Hkv, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D]
        q = q.view(batch, self.num_kv_heads, groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_dim)
