"""The KV memory: one slot of max_model_len positions per running sequence, per layer, allocated once.

Per layer K and V have shape (slots, kv heads, max_len, head dim). A request takes a free slot when it is
admitted and gives it back when it finishes; requests wait for a slot, they never run out of memory.
Memory is allocated uninitialised and zeroed in blocks only as far as sequences reach, so an idle cache
costs address space, not RAM; masked-out positions must hold finite values (0 * NaN is NaN).
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .request import Request

ZERO_BLOCK = 256  # positions zeroed at a time as sequences first reach them (see reach)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V bytes one token takes in every layer, from the model config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())


class SlotCache:
    """K/V per layer in `slots` slots of `max_len` positions; a running request owns one slot."""

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots, self.max_len, self.zeroed = slots, max_len, 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = list(range(slots))

    def allocate(self, request: Request) -> bool:
        """Give the request the lowest free slot; False when every slot is taken (it waits)."""
        if not self._free:
            return False
        self._free.sort()
        request.slot = self._free.pop(0)
        return True

    def free(self, request: Request) -> None:
        if request.slot >= 0:
            self._free.append(request.slot)
            request.slot = -1

    def scrub(self, request: Request) -> None:
        """Zero the request's slot: a failed step may have left inf or NaN there, which even masked-out
        positions pass on to the slot's next user (0 * NaN is NaN)."""
        if request.slot >= 0:
            for k, v in self.layers.values():
                k[request.slot, :, :self.zeroed].zero_()
                v[request.slot, :, :self.zeroed].zero_()

    def usage(self, tokens: int) -> float:
        """The fraction of the cache that `tokens` positions in use fill."""
        return tokens / (self.slots * self.max_len)

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer index's (K, V), allocated at its first use with the shape and dtype of `like`'s heads."""
        if index not in self.layers:
            shape = (self.slots, like.shape[1], self.max_len, like.shape[3])
            k, v = like.new_empty(shape), like.new_empty(shape)
            k[:, :, :self.zeroed].zero_()
            v[:, :, :self.zeroed].zero_()
            self.layers[index] = (k, v)
        return self.layers[index]

    def reach(self, length: int) -> None:
        """Make positions [0, length) of every slot finite before attention reads them."""
        while self.zeroed < length:
            end = min(self.max_len, self.zeroed + ZERO_BLOCK)
            for k, v in self.layers.values():
                k[:, :, self.zeroed:end].zero_()
                v[:, :, self.zeroed:end].zero_()
            self.zeroed = end
