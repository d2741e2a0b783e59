"""The KV memory: one slot of max_model_len positions per running sequence, per layer, allocated once.

Per layer K and V have shape (slots, kv heads, max_len, head dim). A request takes a free slot when it is
admitted and gives it back when it finishes; requests wait for a slot, they never run out of memory.
Prefix reuse: a free slot remembers which tokens (of which task) its K/V hold, and a new request of the
same task takes the free slot sharing the longest prefix with its prompt and computes only the rest (a
task's prompt format, a system prompt, earlier turns of a chat). K and V depend on the adapter, so the
task is part of the key, and `forget()` drops every record when tasks may have been re-registered.
Memory is allocated uninitialised and zeroed in blocks only as far as sequences reach, so an idle cache
costs address space, not RAM; masked-out positions must hold finite values (0 * NaN is NaN).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import PretrainedConfig

from .request import Request, Spec

ZERO_BLOCK = 256  # positions zeroed at a time as sequences first reach them (see reach)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V bytes one token takes in every layer, from the model config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())


class SlotCache:
    """K/V per layer in `slots` slots of `max_len` positions; a running request owns one slot."""

    def __init__(self, slots: int, max_len: int, prefix_caching: bool = True) -> None:
        self.slots, self.max_len, self.zeroed, self.prefix_caching = slots, max_len, 0, prefix_caching
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = list(range(slots))
        self._held: dict[int, tuple[Spec, np.ndarray]] = {}  # free slot -> (task, tokens its K/V hold)
        self._scrubbed: set[int] = set()  # slots a failed request zeroed: they hold nothing
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up, and found (vLLM's counters)

    def allocate(self, request: Request) -> bool:
        """Give the request the free slot holding the longest prefix of its prompt (else the lowest free slot)
        and mark that prefix computed; False when every slot is taken (it waits)."""
        if not self._free:
            return False
        self._free.sort()
        best, hit = self._free[0], 0
        for slot in [] if request.echo else self._free:  # echo needs every prompt position's logits: no reuse
            spec, tokens = self._held.get(slot, (None, None))
            if tokens is not None and spec == request.spec:
                n = min(len(tokens), len(request.prompt))
                differ = np.flatnonzero(tokens[:n] != request.prompt[:n])
                shared = int(differ[0]) if len(differ) else n
                if shared > hit:
                    best, hit = slot, shared
        self._free.remove(best)
        self._held.pop(best, None)
        request.slot = best
        request.computed = min(hit, len(request.prompt) - 1)  # the last prompt token runs: its logits are needed
        self.prefix_queries += len(request.prompt)
        self.prefix_hits += request.computed
        return True

    def free(self, request: Request) -> None:
        """Take the slot back, remembering the tokens whose K/V it holds (the last sampled token has none)."""
        if request.slot >= 0 and self.prefix_caching and request.slot not in self._scrubbed:
            held = np.concatenate([request.prompt, request.tokens[:-1]]) if request.decoding and request.tokens \
                else request.prompt[:request.computed]
            self._held[request.slot] = (request.spec, held.astype(np.int32))
        if request.slot >= 0:
            self._scrubbed.discard(request.slot)
            self._free.append(request.slot)
            request.slot = -1

    def forget(self) -> None:
        """Drop every record of what free slots hold (a task may now mean other weights)."""
        self._held.clear()

    def scrub(self, request: Request) -> None:
        """Zero the request's slot: a failed step may have left inf or NaN there, which even masked-out
        positions pass on to the slot's next user (0 * NaN is NaN)."""
        if request.slot >= 0:
            self._scrubbed.add(request.slot)  # and nothing of it is worth reusing
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
