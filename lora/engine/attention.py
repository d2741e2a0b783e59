"""Attention over the slot KV cache: each token's K/V go into its sequence's slot, each token attends to its slot.

Registered with transformers' AttentionInterface as "lora_slot_cache": the model calls `slot_cache_attention`
in every layer, with the step's `SlotAttention` passed through the forward's kwargs as `lora_step`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_cache import SlotCache

ATTENTION = "lora_slot_cache"


@dataclass
class ChunkRows:
    """Rows [start, end) of the step are prompt positions up to `length` of the sequence in `slot`."""
    start: int
    end: int
    slot: int
    length: int
    causal: torch.Tensor  # (end - start, length) bool: which cached positions each row may see


class DecodeRow(NamedTuple):
    """A decode row's sequence: its slot, and the cached positions it attends over (its length)."""
    slot: int
    length: int


@dataclass
class SlotAttention:
    """One step's layout for attention: decode rows (one per decoding sequence, in slot order), then chunks.

    slots and positions are per row; decode_mask is (hi, 1, 1, decode_len) over slots [0, hi). With `rows` (on a
    CPU) each decode row attends alone over its own length instead: decoding is bound by reading K/V there, and
    one batched call reads every slot up to the longest sequence (4.6% of a decode step on the word trace, 2.7%
    with 400-token shared prompts, one thread; a request then attends the same way alone as batched).
    """
    cache: SlotCache
    slots: torch.Tensor
    positions: torch.Tensor
    n_decode: int
    hi: int
    dense: bool  # the decoding slots are exactly 0..hi-1, in order: no gather or scatter
    decode_len: int
    decode_mask: torch.Tensor | None
    chunks: list[ChunkRows]
    rows: list[DecodeRow] | None = None

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> tuple[torch.Tensor, None]:
        """Write this step's K/V into the cache, then attend each row over its own sequence's slot.

        Grouped-query heads need no copy: the G query heads that share a kv head become G queries of it.
        """
        k_cache, v_cache = self.cache.layer(layer, key)
        heads, d = query.shape[1], query.shape[3]
        kv_heads = k_cache.shape[1]
        groups = heads // kv_heads
        n = self.n_decode
        if self.rows is not None and n == query.shape[2] == 1:  # a single stream: a copy in, views, no copy out
            slot, length = self.rows[0]
            k_cache[slot:slot + 1, :, length - 1:length] = key  # slices of the same shape: no indexing of key
            v_cache[slot:slot + 1, :, length - 1:length] = value
            q = query.reshape(1, kv_heads, groups, d)
            o = F.scaled_dot_product_attention(q, k_cache[slot:slot + 1, :, :length],
                                               v_cache[slot:slot + 1, :, :length], scale=scaling)
            return o.view(1, 1, heads, d), None
        k_cache[self.slots, :, self.positions] = key[0].transpose(0, 1)
        v_cache[self.slots, :, self.positions] = value[0].transpose(0, 1)
        out = query.new_empty(query.shape[2], heads, d)
        if n and self.rows is not None:
            q = query[0, :, :n].reshape(kv_heads, groups, n, d).permute(2, 0, 1, 3)  # (n, kv heads, G, d)
            for i, (slot, length) in enumerate(self.rows):
                o = F.scaled_dot_product_attention(q[i:i + 1], k_cache[slot:slot + 1, :, :length],
                                                   v_cache[slot:slot + 1, :, :length], scale=scaling)
                out[i] = o.reshape(heads, d)
        elif n:
            q = query[0, :, :n].reshape(kv_heads, groups, n, d).permute(2, 0, 1, 3)  # (n, kv heads, G, d)
            decode_slots = self.slots[:n]
            if not self.dense:
                q = q.new_zeros(self.hi, kv_heads, groups, d).index_copy_(0, decode_slots, q)
            o = F.scaled_dot_product_attention(q, k_cache[:self.hi, :, :self.decode_len],
                                               v_cache[:self.hi, :, :self.decode_len],
                                               attn_mask=self.decode_mask, scale=scaling)
            if not self.dense:
                o = o.index_select(0, decode_slots)
            out[:n] = o.reshape(n, heads, d)
        for c in self.chunks:
            rows = c.end - c.start
            q = query[:, :, c.start:c.end].reshape(1, kv_heads, groups * rows, d)
            o = F.scaled_dot_product_attention(q, k_cache[c.slot:c.slot + 1, :, :c.length],
                                               v_cache[c.slot:c.slot + 1, :, :c.length],
                                               attn_mask=c.causal.repeat(groups, 1), scale=scaling)
            out[c.start:c.end] = o[0].reshape(kv_heads, groups, rows, d).permute(2, 0, 1, 3).reshape(rows, heads, d)
        return out[None], None


def slot_cache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         lora_step: SlotAttention | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The engine's attention; any call without an engine step (training, `apply_downstream`) is plain SDPA."""
    if lora_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return lora_step.attend(module.layer_idx, query, key, value, scaling)  # type: ignore[arg-type]


AttentionInterface.register(ATTENTION, slot_cache_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
