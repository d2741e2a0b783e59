"""The prefix cache: full blocks of computed K/V, keyed by (task, every token up to the block's end), in a bounded pool.

vLLM's automatic prefix caching, shaped for the slot cache (decoding stays contiguous per slot, no paged kernel):
a block is `block_size` positions of K and V of every layer. Its key chains the block before it: (task, the
parent block's id, its own tokens); K and V depend on the adapter, so the task is part of the key. The dict is
keyed by that tuple itself, so a lookup is exact (Python compares the tuples: no hash collision can hand a request
another prompt's K/V). When a request is admitted, its longest cached prefix is COPIED into its slot (copying 500
tokens' K/V takes milliseconds, computing them about a second on a CPU); after each step the full blocks a request
has computed are copied into the pool. A copy holds no reference, so any number of requests, running at once or
later, reuse one block, and a block outlives the slot and the request that computed it.
Eviction: least recently used. A lookup touches a prefix's blocks from its end to its start, so a parent is always
more recent than its children and leaves go first. Ids are never reused: a block whose parent was evicted can no
longer be reached, and ages out.
Memory: `max_blocks` blocks, allocated uninitialised at the first store (address space until blocks are written),
never more: `prefix_cache_bytes` bounds it.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .request import Spec

Layers = dict[int, tuple[torch.Tensor, torch.Tensor]]  # the slot cache's K and V per layer


class Block(NamedTuple):
    """A cached block: its id (never reused) and its place in the pool."""
    id: int
    place: int


@dataclass
class Chain:
    """How far a slot's sequence is in the pool: its first `blocks` blocks are there, the last one with id `last`."""
    blocks: int = 0
    last: int = -1
    ids: set[int] = field(default_factory=set)  # its blocks' ids: storing more of it never evicts them


class PrefixCache:
    """A pool of `max_blocks` blocks of `block_size` positions, for every layer; least recently used goes first."""

    def __init__(self, block_size: int, max_blocks: int) -> None:
        self.block_size, self.max_blocks = block_size, max_blocks
        self.pool: dict[int, torch.Tensor] = {}  # layer -> (2, max_blocks, kv heads, block_size, head dim)
        self._blocks: OrderedDict[tuple[Spec, int, bytes], Block] = OrderedDict()  # least recent first
        self._free: list[int] = []  # places freed by eviction
        self._unused = 0  # places below this were handed out once (a count, not a list: max_blocks may be large)
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, spec: Spec, tokens: np.ndarray, touch: bool = True) -> list[Block]:
        """The cached blocks of the longest prefix of `tokens` (whole blocks), marked most recently used (touch)."""
        found: list[Block] = []
        keys = []
        size, parent = self.block_size, -1
        for start in range(0, len(tokens) - size + 1, size):
            key = (spec, parent, tokens[start:start + size].tobytes())
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
            keys.append(key)
            parent = block.id
        for key in reversed(keys if touch else []):  # the end of the prefix first: its parents stay more recent
            self._blocks.move_to_end(key)
        return found

    def load(self, blocks: list[Block], layers: Layers, slot: int) -> None:
        """Copy `blocks` into positions [0, len(blocks) * block_size) of `slot`."""
        if not blocks:
            return
        end = len(blocks) * self.block_size
        for layer, (k, v) in layers.items():
            index = torch.tensor([b.place for b in blocks], device=k.device)
            pool = self.pool[layer][:, index]  # (2, blocks, kv heads, block_size, head dim)
            kv = pool.permute(0, 2, 1, 3, 4).reshape(2, k.shape[1], end, k.shape[3])
            k[slot, :, :end] = kv[0]
            v[slot, :, :end] = kv[1]

    def store(self, spec: Spec, tokens: np.ndarray, chain: Chain, layers: Layers, slot: int) -> None:
        """Copy the full blocks of `tokens` (whose K/V `slot` holds) past `chain.blocks` into the pool."""
        size = self.block_size
        new: list[tuple[int, int]] = []  # (block of the sequence, pool index)
        keys = []
        for b in range(chain.blocks, len(tokens) // size):
            key = (spec, chain.last, tokens[b * size:(b + 1) * size].tobytes())
            block = self._blocks.get(key)
            if block is None:
                if not self._free and self._unused == self.max_blocks:
                    if next(iter(self._blocks.values())).id in chain.ids:
                        break  # the pool is full of this sequence: its deeper blocks would evict its own
                    self._free.append(self._blocks.popitem(last=False)[1].place)
                if not self._free:
                    self._free.append(self._unused)
                    self._unused += 1
                block = self._blocks[key] = Block(next(self._ids), self._free.pop())
                new.append((b, block.place))
            self._blocks.move_to_end(key)  # now: the eviction of a later block must not take this one
            keys.append(key)
            chain.blocks, chain.last = b + 1, block.id
            chain.ids.add(block.id)
        for key in reversed(keys):  # parents more recent than their children (see the module doc)
            self._blocks.move_to_end(key)
        if not new:
            return
        for layer, (k, v) in layers.items():
            sequence_blocks = torch.tensor([b for b, _ in new], device=k.device)
            index = torch.tensor([i for _, i in new], device=k.device)
            if layer not in self.pool:
                self.pool[layer] = k.new_empty(2, self.max_blocks, k.shape[1], size, k.shape[3])
            end = chain.blocks * size
            for which, cache in enumerate((k, v)):
                blocks = cache[slot, :, :end].reshape(k.shape[1], chain.blocks, size, k.shape[3])
                self.pool[layer][which, index] = blocks[:, sequence_blocks].transpose(0, 1)

    def clear(self) -> None:
        """Forget every block (a task may now mean other weights); the memory stays for reuse."""
        self._blocks.clear()
        self._free, self._unused = [], 0
