"""The KV memory: one slot of max_model_len positions per running sequence, per layer, allocated once.

Per layer K and V have shape (slots, kv heads, max_len, head dim). A request takes a free slot when it is
admitted and gives it back when it finishes; requests wait for a slot, they never run out of memory.
Prefix caching (prefix_cache.py): an admitted request's longest cached prefix (of its task) is copied into its
slot and only the rest is computed; the full blocks it computes are copied into the prefix cache after each
step, and those of its answer when it finishes (earlier turns of a chat). `reuse()` tells the scheduler how much
of a waiting request's prompt is cached, and how much more running requests are prefilling now (it may wait for
those instead of computing them again). `forget()` drops every block when tasks may have been re-registered.
Memory is allocated uninitialised and zeroed in blocks only as far as sequences reach, so an idle cache
costs address space, not RAM; masked-out positions must hold finite values (0 * NaN is NaN).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import PretrainedConfig

from .prefix_cache import Chain, PrefixCache
from .request import Request
from .scheduler import Reuse

log = logging.getLogger("lora.engine")

ZERO_BLOCK = 256  # positions zeroed at a time as sequences first reach them (see reach)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V bytes one token takes in every layer, from the model config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())


class SlotCache:
    """K/V per layer in `slots` slots of `max_len` positions; a running request owns one slot."""

    def __init__(self, slots: int, max_len: int, prefix: PrefixCache | None = None) -> None:
        self.slots, self.max_len, self.zeroed, self.prefix = slots, max_len, 0, prefix
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = list(range(slots))
        self._chains: dict[int, Chain] = {}  # running slot -> how far its sequence is in the prefix cache
        self._requests: dict[int, Request] = {}  # running slot -> its request (what it will store: see reuse)
        self._scrubbed: set[int] = set()  # slots a failed request zeroed: nothing of them is worth keeping
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up, and found (vLLM's counters)

    def allocate(self, request: Request) -> bool:
        """Give the request the lowest free slot with its prompt's longest cached prefix copied in, and mark that
        prefix computed; False when every slot is taken (it waits)."""
        if not self._free:
            return False
        self._free.sort()
        request.slot = self._free.pop(0)
        request.computed = 0
        self._requests[request.slot] = request
        if self.prefix is None:
            return True
        blocks = [] if request.echo else self.prefix.match(request.spec, request.prompt[:-1])  # echo: every
        # prompt position's logits are needed; and the last prompt token always runs: its logits are needed
        if blocks:
            request.computed = len(blocks) * self.prefix.block_size
            self.reach(request.computed)
            self.prefix.load(blocks, self.layers, request.slot)
        self._chains[request.slot] = Chain(len(blocks), blocks[-1].id if blocks else -1, {b.id for b in blocks})
        self.prefix_queries += len(request.prompt)
        self.prefix_hits += request.computed
        return True

    def keep(self, request: Request) -> None:
        """Copy the full blocks of the request's computed tokens that the prefix cache lacks into it."""
        chain = self._chains.get(request.slot)
        if chain is None or self.prefix is None or request.slot in self._scrubbed:
            return
        held = np.concatenate([request.prompt, request.tokens[:-1]]).astype(np.int32) \
            if request.decoding and request.tokens else request.prompt[:request.computed]
        if len(held) >= (chain.blocks + 1) * self.prefix.block_size:
            try:
                self.prefix.store(request.spec, held, chain, self.layers, request.slot)
            except Exception:  # noqa: BLE001 - a cache must never fail a request (e.g. its pool cannot be allocated)
                log.exception("the prefix cache failed; prefix caching is off from now on")
                self.prefix.clear()  # blocks registered before the failed copy would hold no K/V
                self.prefix = None

    def reuse(self, request: Request) -> Reuse:
        """Prompt tokens of a waiting request that the prefix cache holds (looked up only as far as the blocks in
        flight reach: 0 when none are), and how many more (whole blocks) running requests of its task are
        prefilling now and will store: those whose blocks are being kept (not scrubbed, not forgotten). Touches
        nothing: the scheduler asks every step, before admitting; with no slot free the request cannot be admitted
        anyway, so nothing is looked up (a long queue costs no comparisons then)."""
        if self.prefix is None or request.echo or not self._free:
            return Reuse(0, 0)
        size, tokens, end = self.prefix.block_size, request.prompt[:-1], 0  # the last prompt token always runs
        for slot, other in self._requests.items():
            chain = self._chains.get(slot)
            if other.decoding or other.spec != request.spec or chain is None or slot in self._scrubbed:
                continue
            n = min(len(tokens), len(other.prompt))
            differ = np.flatnonzero(tokens[:n] != other.prompt[:n])
            blocks = (int(differ[0]) if len(differ) else n) // size
            if blocks > chain.blocks:  # it has some of them still to compute
                end = max(end, blocks)
        if not end:
            return Reuse(0, 0)
        cached = len(self.prefix.match(request.spec, tokens[:end * size], touch=False))  # more would not change it
        return Reuse(cached * size, max(0, end - cached) * size)

    def free(self, request: Request) -> None:
        """Take the slot back, keeping the blocks of its answer too (the last sampled token has no K/V)."""
        if request.slot >= 0:
            self.keep(request)
            self._chains.pop(request.slot, None)
            self._requests.pop(request.slot, None)
            self._scrubbed.discard(request.slot)
            self._free.append(request.slot)
            request.slot = -1

    def forget(self) -> None:
        """Drop every cached block, and stop keeping those of running requests (a task may now mean other
        weights: what they computed so far used the old ones)."""
        if self.prefix is not None:
            self.prefix.clear()
        self._chains.clear()

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

    def prefix_usage(self) -> float:
        """The fraction of the prefix cache's blocks that hold a prefix (0 when it is off)."""
        return len(self.prefix) / self.prefix.max_blocks if self.prefix is not None else 0.0

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
