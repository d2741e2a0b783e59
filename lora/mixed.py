"""Mixed-task batches: over the base weights, each token gets the low-rank update of its own task, at flat cost.

Adapters live in preallocated slots (vLLM's max_loras): per adapted module, every slot's A as (slots, in, R)
and B as (slots, R, out), zero-padded to the largest rank R, in the update dtype (float32 by default, so
bfloat16 and float16 models round the update once, when it is added, not per factor). A new task takes a
free (or the least recently used) slot; the other slots stay as they are.

Per step the tokens are sorted by slot once (`Segments`), and each module applies each task's A and B to
that task's tokens only (Punica/S-LoRA's segmented matmul): the small segments (decode rows) padded into one
batched matmul over the slots they use, each big one (a prompt chunk) on its own. The cost follows the
tokens, not the number of distinct tasks in the step. A step whose tokens all have one task (every decode
step of a single stream) skips the grouping: its rows are that one group as they are.

Compiled decode steps (lora.engine.compiled) take the update another way, with fixed shapes: `slot_tree` copies
the model's module tree (sharing every parameter and buffer) with each adapted module wrapped in a
`SlotUpdate`, which gathers every row's A and B from the slot tensors by a per-row slot index (Punica's BGMV,
vLLM's LoRA in CUDA graphs). The slot tensors and the index are read at each call, so compiled code takes them as
inputs: one graph serves any mix of tasks, and a task taking a slot needs no recompile.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import Adapter

Hook = Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]
Key = tuple[str, int]  # a task's name and registration number: a re-registered task is other weights


@dataclass
class SlotWeights:
    """One module's adapter slots."""
    module: torch.nn.Module
    A: torch.Tensor  # (slots, in, R); for an Embedding (slots, vocabulary, R)
    B: torch.Tensor  # (slots, R, out)
    embedding: bool


class AdapterSlots:
    """`capacity` adapter slots per adapted module, filled one task at a time, least recently used reused."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, capacity: int) -> None:
        self.model, self.dtype, self.capacity = model, dtype, capacity
        self.modules: dict[str, SlotWeights] = {}
        self.scales = torch.zeros(capacity, dtype=dtype, device=next(model.parameters()).device)
        self.owners: list[Key | None] = [None] * capacity
        self.adapted: list[frozenset[str]] = [frozenset()] * capacity  # the modules each slot's task adapts
        self._used = [0] * capacity  # when each slot was last asked for
        self._clock = 0

    def acquire(self, keys: Sequence[Key], read: Callable[[str], Adapter]) -> list[int]:
        """The slot of each task, loading (with `read(name)`) those not in a slot; grows to hold them all."""
        if len(keys) > self.capacity:
            self.resize(len(keys))
        self._clock += 1
        where = {key: slot for slot, key in enumerate(self.owners) if key is not None}
        wanted = {where[key] for key in keys if key in where}
        slots = []
        for key in keys:
            slot = where.get(key)
            if slot is None:
                adapter = read(key[0])  # may raise (unreadable, overflows): the slots stay as they were
                slot = min((s for s in range(self.capacity) if s not in wanted), key=lambda s: self._used[s])
                self._load(slot, key, adapter)
                where[key] = slot
                wanted.add(slot)
            self._used[slot] = self._clock
            slots.append(slot)
        return slots

    def _load(self, slot: int, key: Key, adapter: Adapter) -> None:
        """Write one task's A and B (zero-padded to R) into `slot` of every module, zeros where it adapts none."""
        self.owners[slot] = None  # a failure halfway leaves the slot empty, never half one task's
        for name, m in adapter.modules.items():
            self._room(name, m.A.shape[1], m.B.shape[0], m.A.shape[0], m.embedding)
        for name, weights in self.modules.items():
            weights.A[slot].zero_()
            weights.B[slot].zero_()
            own = adapter.modules.get(name)
            if own is not None:
                r = own.A.shape[0]
                weights.A[slot, :, :r] = own.A.T
                weights.B[slot, :r] = own.B.T
        scalings = {m.scaling for m in adapter.modules.values()}
        if len(scalings) > 1:  # one scale per slot: fold per-module ones into B
            for name, m in adapter.modules.items():
                self.modules[name].B[slot] *= m.scaling
            scalings = {1.0}
        self.scales[slot] = scalings.pop() if scalings else 0.0
        self.owners[slot], self.adapted[slot] = key, frozenset(adapter.modules)

    def _room(self, name: str, fan_in: int, fan_out: int, rank: int, embedding: bool) -> None:
        """Make sure module `name` has slots of at least `rank`."""
        weights = self.modules.get(name)
        if weights is not None and weights.A.shape[2] >= rank:
            return
        device = self.scales.device
        A = torch.zeros(self.capacity, fan_in, rank, dtype=self.dtype, device=device)
        B = torch.zeros(self.capacity, rank, fan_out, dtype=self.dtype, device=device)
        if weights is not None:
            old = weights.A.shape[2]
            A[:, :, :old], B[:, :old] = weights.A, weights.B
        self.modules[name] = SlotWeights(self.model.get_submodule(name), A, B, embedding)

    @property
    def layout(self) -> tuple[tuple[str, int, bool], ...]:
        """What a compiled update's graph depends on beyond tensor values: each module's name, rank and kind."""
        return tuple((name, w.A.shape[2], w.embedding) for name, w in self.modules.items())

    def resize(self, capacity: int) -> None:
        """More slots (more distinct tasks in one step than ever before); what the old ones hold stays."""
        extra = capacity - self.capacity
        for weights in self.modules.values():
            weights.A = torch.cat([weights.A, weights.A.new_zeros(extra, *weights.A.shape[1:])])
            weights.B = torch.cat([weights.B, weights.B.new_zeros(extra, *weights.B.shape[1:])])
        self.scales = torch.cat([self.scales, self.scales.new_zeros(extra)])
        self.owners += [None] * extra
        self.adapted += [frozenset()] * extra
        self._used += [0] * extra
        self.capacity = capacity


@dataclass
class Segments:
    """A step's tokens grouped by slot: small groups padded to `length` rows for one batched matmul, big ones alone.

    Padded position p = i * length + k is the k-th token of slot `slots[i]` (rows[p]), or padding (rows[p] = 0,
    masked out: valid[p] False). The padded slots are a contiguous range `span` of the slot tensors when
    that range is not much wider than the slots in use (no copy of A and B), else `slots`.
    """
    length: int
    rows: torch.Tensor  # (padded,) token row of each padded position
    valid: torch.Tensor | None  # (padded groups, length, 1) bool, None without padding
    kept: torch.Tensor | None  # positions that are not padding, None without padding
    kept_rows: torch.Tensor  # their token rows
    slot_of_position: torch.Tensor  # (padded,) the slot of each position (for Embedding lookups)
    span: slice | None
    slots: torch.Tensor  # (padded groups,) the slots padded into the batched matmul
    alone: list[tuple[int, torch.Tensor]]  # (slot, token rows) of each big group


def segments(token_slots: np.ndarray, device: torch.device) -> Segments | None:
    """Group a step's tokens (slot per token, -1: none) by slot, once per step; None when no token has a task."""
    tokens = np.flatnonzero(token_slots >= 0)
    if not len(tokens):
        return None
    order = tokens[np.argsort(token_slots[tokens], kind="stable")]
    sorted_slots = token_slots[order]
    present, starts, counts = np.unique(sorted_slots, return_index=True, return_counts=True)
    limit = max(1, 2 * math.ceil(len(tokens) / len(present)))  # groups above this run alone: padding stays < 2x
    alone = [(int(s), torch.as_tensor(order[a:a + c], device=device))
             for s, a, c in zip(present, starts, counts) if c > limit]
    small = counts <= limit
    present, starts, counts = present[small], starts[small], counts[small]
    if not len(present):
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Segments(0, empty, None, None, empty, empty, None, empty, alone)
    length = int(counts.max())
    lo, hi = int(present[0]), int(present[-1]) + 1
    padded = np.arange(lo, hi) if hi - lo <= 2 * len(present) else present
    group = np.searchsorted(padded, present)
    positions = np.concatenate([g * length + np.arange(c) for g, c in zip(group, counts)])
    kept_rows = np.concatenate([order[a:a + c] for a, c in zip(starts, counts)])
    rows = np.zeros(len(padded) * length, dtype=np.int64)
    rows[positions] = kept_rows
    full = len(positions) == len(rows)
    valid = np.zeros(len(rows), dtype=bool)
    valid[positions] = True

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)
    return Segments(length, as_tensor(rows), None if full else as_tensor(valid).view(len(padded), length, 1),
                    None if full else as_tensor(positions), as_tensor(kept_rows),
                    as_tensor(np.repeat(padded, length)), slice(lo, hi) if len(padded) == hi - lo else None,
                    as_tensor(padded), alone)


class MixedAdapters:
    """Forward hooks adding to each token the low-rank update of its own task (one of `tasks`), over the base.

    `acquire(tasks)` gives each task's slot (loading it if another task took the slot since), once per step.
    """

    def __init__(self, slots: AdapterSlots, tasks: Sequence[str],
                 acquire: Callable[[Sequence[str]], list[int]]) -> None:
        self.tasks = tuple(tasks)
        self.table = slots
        self._acquire = acquire
        self._token_slots: torch.Tensor | None = None
        self._segments: dict[tuple[int, ...], Segments | None] = {}
        self._modules: list[SlotWeights] = []
        self._whole: slice | None = None  # the slot of every token, in a step of one task (else None)

    def select(self, index: torch.Tensor) -> None:
        """Which task each token (batch, seq) or row (batch, 1) uses from now on: 0 the base, i + 1 tasks[i]."""
        slots = self._acquire(self.tasks)
        lookup = torch.tensor([-1, *slots])
        self._token_slots = lookup[index.cpu()]  # a host copy: grouping tokens needs no device sync
        self._segments = {}
        first = int(self._token_slots.reshape(-1)[0])
        self._whole = slice(first, first + 1) if first >= 0 and bool((self._token_slots == first).all()) else None
        adapted = set().union(*(self.table.adapted[s] for s in slots))
        self._modules = [w for name, w in self.table.modules.items() if name in adapted]

    @property
    def token_slots(self) -> torch.Tensor:
        """The slot of each token selected (as `select`'s index shaped; -1: the base), on the host."""
        assert self._token_slots is not None, "select() first"
        return self._token_slots

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks on the model for one forward (or one `with` block), and never left behind."""
        handles = [w.module.register_forward_hook(self._hook(w)) for w in self._modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _grouped(self, shape: tuple[int, ...], device: torch.device) -> Segments | None:
        """The tokens of an input of `shape` (batch, seq) grouped by slot, computed once per step."""
        if shape not in self._segments:
            assert self._token_slots is not None, "select() before the forward"
            token_slots = self._token_slots.expand(shape).reshape(-1).numpy()
            self._segments[shape] = segments(token_slots, device)
        return self._segments[shape]

    def _hook(self, w: SlotWeights) -> Hook:
        """A forward hook adding scale * (x @ A) @ B of each token's slot to a module's output.

        The update is computed in the slots' dtype and added before the one rounding to the output's dtype.
        """
        scales = self.table.scales

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            whole = self._whole
            if whole is not None and not w.embedding:  # one task: the one padded group segments() would make
                flat_out = out.view(-1, out.shape[-1])
                h = torch.bmm(x.reshape(1, -1, x.shape[-1]).to(w.A.dtype), w.A[whole]) * scales[whole].view(-1, 1, 1)
                _add(flat_out, None, torch.bmm(h, w.B[whole]).view(-1, flat_out.shape[-1]))
                return out
            groups = self._grouped(tuple(x.shape if w.embedding else x.shape[:-1]), x.device)
            if groups is None:
                return out
            flat_x = x.reshape(-1) if w.embedding else x.reshape(-1, x.shape[-1])
            flat_out = out.view(-1, out.shape[-1])
            if len(groups.rows):
                B = w.B[groups.span] if groups.span else w.B.index_select(0, groups.slots)
                n_groups = len(groups.slots)
                if w.embedding:
                    h = w.A[groups.slot_of_position, flat_x[groups.rows]].view(n_groups, groups.length, -1)
                else:
                    A = w.A[groups.span] if groups.span else w.A.index_select(0, groups.slots)
                    x_rows = flat_x.index_select(0, groups.rows).to(w.A.dtype)
                    h = torch.bmm(x_rows.view(n_groups, groups.length, -1), A)
                h = h * scales[groups.slots].view(-1, 1, 1)
                if groups.valid is not None:
                    h = torch.where(groups.valid, h, 0.0)  # padding adds nothing, even if its row is not finite
                update = torch.bmm(h, B).view(-1, flat_out.shape[-1])
                if groups.kept is not None:
                    update = update.index_select(0, groups.kept)
                _add(flat_out, groups.kept_rows, update)
            for slot, rows in groups.alone:
                x_rows = flat_x[rows] if w.embedding else flat_x.index_select(0, rows).to(w.A.dtype)
                h = w.A[slot][x_rows] if w.embedding else x_rows @ w.A[slot]
                _add(flat_out, rows, (h * scales[slot]) @ w.B[slot])
            return out
        return hook


class RowSlots:
    """The adapter slot of each row of a compiled decode step (-1: the base), shared by a tree's SlotUpdates."""

    def __init__(self, device: torch.device) -> None:
        self.index = torch.full((1,), -1, dtype=torch.long, device=device)


class SlotUpdate(torch.nn.Module):
    """`base` plus each row's own slot's update: scale * (x @ A[slot]) @ B[slot], rows of slot -1 adding nothing.

    Fixed shapes (each row gathers its slot's A and B), so the update sits inside a compiled graph; computed in
    the slots' dtype and added before the output's one rounding, as the hooks do. Written as products summed,
    not matmuls: inductor fuses each into one loop reading the gathered slot (measured on a w8a16 SmolLM2 layer,
    one row, one thread, loaded: +9 us over the layer's 95 us, where gather-and-bmm cost +31 us).
    """

    def __init__(self, base: torch.nn.Module, weights: SlotWeights, table: AdapterSlots, rows: RowSlots) -> None:
        super().__init__()
        self.base, self.weights, self.table, self.rows = base, weights, table, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, w, index = self.base(x), self.weights, self.rows.index
        slot = index.clamp(min=0)
        if w.embedding:
            h = w.A[slot, x.reshape(-1)]
        else:
            h = (x.reshape(-1, x.shape[-1], 1).to(w.A.dtype) * w.A[slot]).sum(1)
        h = torch.where((index >= 0)[:, None], h * self.table.scales[slot][:, None], 0.0)
        update = (h[:, :, None] * w.B[slot]).sum(1).view(out.shape)
        return out + update if out.dtype == update.dtype else (out.to(update.dtype) + update).to(out.dtype)


FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs")  # nn.Module's per-module forward hook dicts


def slot_tree(model: torch.nn.Module, table: AdapterSlots, rows: RowSlots) -> torch.nn.Module:
    """A copy of `model`'s module tree in which each module of `table` is a SlotUpdate around its copy.

    Every parameter and buffer is shared (a switch of the model's weights is the copy's too); the modules are
    copies with forward hooks of their own, so hooks added to the model later (a mixed step's, an applied task's)
    and forward methods set on its modules for one step (engine.packed) never reach the copy."""
    copies: dict[int, torch.nn.Module] = {}

    def copied(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) not in copies:
            twin = copies[id(module)] = copy.copy(module)
            for name in FORWARD_HOOKS:
                twin.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
            twin.__dict__["_modules"] = {k: None if m is None else copied(m) for k, m in module._modules.items()}
        return copies[id(module)]
    root = copied(model)
    for name, weights in table.modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        parent._modules[leaf] = SlotUpdate(parent.get_submodule(leaf), weights, table, rows)
    return root


def _add(out: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor) -> None:
    """out[rows] += update (rows None: every row), rounded once to out's dtype."""
    if rows is None and out.dtype == update.dtype:
        out.add_(update)
    elif rows is None:
        out.copy_(out.to(update.dtype) + update)
    elif out.dtype == update.dtype:
        out.index_add_(0, rows, update)
    else:
        out.index_copy_(0, rows, (out.index_select(0, rows).to(update.dtype) + update).to(out.dtype))
