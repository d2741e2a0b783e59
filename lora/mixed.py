"""Mixed-task batches: over the base weights, each token gets the low-rank update of its own task, at flat cost.

Adapters live in preallocated slots (vLLM's max_loras): per adapted module, every slot's A as (slots, R, in)
(PEFT's layout) and B as (slots, R, out) with the task's scaling folded in, zero-padded to the largest rank R,
in the update dtype (float32 by default, so bfloat16 and float16 models round the update once, when it is
added, not per factor). A new task takes a free (or the least recently used) slot; the others stay as they are.

Each step is planned once, on the host. A step of few tokens (decode rows) over a few neighbouring slots is
`Spanned`: every token times the A's of the slots in that range side by side (one matmul), each token's
products of other slots zeroed by a mask, then times their B's stacked (one matmul added in place), so a
module costs three ops whatever the mix; the wasted products are few because tokens x slots is small. Other
steps are sorted by slot once (`Segments`), and each module applies each task's A and B to that task's tokens
only (Punica/S-LoRA's segmented matmul): the small segments padded into one batched matmul over the slots
they use, each big one (a prompt chunk) on its own. The cost follows the tokens, not the number of tasks.

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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Adapter

Hook = Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]
Key = tuple[str, int]  # a task's name and registration number: a re-registered task is other weights


@dataclass
class SlotWeights:
    """One module's adapter slots."""
    module: torch.nn.Module
    A: torch.Tensor  # (slots, R, in); for an Embedding (slots, R, vocabulary)
    B: torch.Tensor  # (slots, R, out), times each slot's task's scaling
    embedding: bool
    spans: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # see span()

    def span(self, slots: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The A's of a range of slots side by side, (in, slots * R), and their B's stacked, (slots * R, out).

        Views of A and B, kept between steps (making them cost more than the tiny matmuls that use them)."""
        key = (slots.start, slots.stop)
        views = self.spans.get(key)
        if views is None:
            A, B = self.A[slots], self.B[slots]
            views = self.spans[key] = A.reshape(-1, A.shape[-1]).t(), B.reshape(-1, B.shape[-1])
        return views


class AdapterSlots:
    """`capacity` adapter slots per adapted module, filled one task at a time, least recently used reused."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, capacity: int) -> None:
        self.model, self.dtype, self.capacity = model, dtype, capacity
        self.modules: dict[str, SlotWeights] = {}
        self.device = next(model.parameters()).device
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
        """Write one task's A and scaling * B (zero-padded to R) into `slot` of every module, zeros where it adapts
        none. The scaling is folded in here, once, so that no step multiplies by it."""
        self.owners[slot] = None  # a failure halfway leaves the slot empty, never half one task's
        for name, m in adapter.modules.items():
            self._room(name, m.A.shape[1], m.B.shape[0], m.A.shape[0], m.embedding)
        for name, weights in self.modules.items():
            weights.A[slot].zero_()
            weights.B[slot].zero_()
            own = adapter.modules.get(name)
            if own is not None:
                r = own.A.shape[0]
                weights.A[slot, :r] = own.A
                weights.B[slot, :r] = own.B.T * own.scaling
        self.owners[slot], self.adapted[slot] = key, frozenset(adapter.modules)

    def _room(self, name: str, fan_in: int, fan_out: int, rank: int, embedding: bool) -> None:
        """Make sure module `name` has slots of at least `rank`."""
        weights = self.modules.get(name)
        if weights is not None and weights.A.shape[1] >= rank:
            return
        A = torch.zeros(self.capacity, rank, fan_in, dtype=self.dtype, device=self.device)
        B = torch.zeros(self.capacity, rank, fan_out, dtype=self.dtype, device=self.device)
        if weights is not None:
            old = weights.A.shape[1]
            A[:, :old], B[:, :old] = weights.A, weights.B
        self.modules[name] = SlotWeights(self.model.get_submodule(name), A, B, embedding)

    @property
    def layout(self) -> tuple[tuple[str, int, bool], ...]:
        """What a compiled update's graph depends on beyond tensor values: each module's name, rank and kind."""
        return tuple((name, w.A.shape[1], w.embedding) for name, w in self.modules.items())

    def resize(self, capacity: int) -> None:
        """More slots (more distinct tasks in one step than ever before); what the old ones hold stays."""
        extra = capacity - self.capacity
        for weights in self.modules.values():
            weights.A = torch.cat([weights.A, weights.A.new_zeros(extra, *weights.A.shape[1:])])
            weights.B = torch.cat([weights.B, weights.B.new_zeros(extra, *weights.B.shape[1:])])
            weights.spans.clear()
        self.owners += [None] * extra
        self.adapted += [frozenset()] * extra
        self._used += [0] * extra
        self.capacity = capacity


SPAN_LIMIT = 32  # tokens x slots in the range at most, for a Spanned step (see `plan`)


@dataclass
class Spanned:
    """A step's tokens against every slot of the range `span` at once; each token keeps its own slot's products.

    mask (tokens, slots in span, 1) is 1 at each token's own slot and 0 elsewhere (a token without a task: 0
    everywhere); None when every token has the range's one slot.
    """
    span: slice
    mask: torch.Tensor | None


@dataclass
class Segments:
    """A step's tokens grouped by slot: small groups padded to `length` rows for one batched matmul, big ones alone.

    Padded position p = i * length + k is the k-th token of slot `slots[i]` (rows[p]), or padding (rows[p] = 0),
    whose products are dropped (`kept`): a matmul's output rows each depend on their own input row only, so a
    padding row, even one that is not finite, reaches no token. The padded slots are a contiguous range `span` of
    the slot tensors when that range is not much wider than the slots in use (no copy of A and B), else `slots`.
    """
    length: int
    rows: torch.Tensor  # (padded,) token row of each padded position
    kept: torch.Tensor | None  # positions that are not padding, None without padding
    kept_rows: torch.Tensor  # their token rows
    slot_of_position: torch.Tensor  # (padded,) the slot of each position (for Embedding lookups)
    span: slice | None
    slots: torch.Tensor  # (padded groups,) the slots padded into the batched matmul
    alone: list[tuple[int, torch.Tensor]]  # (slot, token rows) of each big group


def plan(token_slots: np.ndarray, dtype: torch.dtype, device: torch.device) -> Spanned | Segments | None:
    """How a step's tokens (slot per token, -1: none) take their updates, decided once per step; None: no token
    has a task. Spanned when the tokens have one slot, or when tokens x slots in their range is at most
    SPAN_LIMIT: then the products of other slots cost less than the gathers and scatters of segments. Measured
    (SmolLM2-135M float32, prepacked weights, one thread, CPU time, loaded): 8 decode rows of 3 tasks cost 1.26x
    the base model's step spanned, 1.36x in segments; at 8 rows x 8 slots the two are even, at 16 x 4 segments
    win."""
    used = token_slots[token_slots >= 0]
    if not len(used):
        return None
    lo, hi = int(used.min()), int(used.max()) + 1
    if hi - lo > 1 and len(token_slots) * (hi - lo) > SPAN_LIMIT:
        return segments(token_slots, device)
    if len(used) == len(token_slots) and hi - lo == 1:
        return Spanned(slice(lo, hi), None)
    mask = token_slots[:, None] == np.arange(lo, hi)[None, :]
    return Spanned(slice(lo, hi), torch.as_tensor(mask[:, :, None], device=device).to(dtype))


def segments(token_slots: np.ndarray, device: torch.device) -> Segments:
    """Group a step's tokens (slot per token, -1: none; at least one with a slot) by slot."""
    tokens = np.flatnonzero(token_slots >= 0)
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
        return Segments(0, empty, None, empty, empty, None, empty, alone)
    length = int(counts.max())
    lo, hi = int(present[0]), int(present[-1]) + 1
    padded = np.arange(lo, hi) if hi - lo <= 2 * len(present) else present
    group = np.searchsorted(padded, present)
    positions = np.concatenate([g * length + np.arange(c) for g, c in zip(group, counts)])
    kept_rows = np.concatenate([order[a:a + c] for a, c in zip(starts, counts)])
    rows = np.zeros(len(padded) * length, dtype=np.int64)
    rows[positions] = kept_rows

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)
    return Segments(length, as_tensor(rows), None if len(positions) == len(rows) else as_tensor(positions),
                    as_tensor(kept_rows), as_tensor(np.repeat(padded, length)),
                    slice(lo, hi) if len(padded) == hi - lo else None, as_tensor(padded), alone)


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
        self._by_tokens: dict[tuple[int, ...], Spanned | Segments | None] = {}  # this step's plans
        self._plans: dict[torch.Size, Spanned | Segments | None] = {}  # the same, by linear layers' input shapes
        self._modules: list[SlotWeights] = []

    def select(self, index: torch.Tensor) -> None:
        """Which task each token (batch, seq) or row (batch, 1) uses from now on: 0 the base, i + 1 tasks[i]."""
        slots = self._acquire(self.tasks)
        lookup = torch.tensor([-1, *slots])
        self._token_slots = lookup[index.cpu()]  # a host copy: planning the step needs no device sync
        self._by_tokens, self._plans = {}, {}
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

    def _plan(self, tokens: tuple[int, ...], device: torch.device) -> Spanned | Segments | None:
        """The plan for tokens shaped `tokens` (batch, seq), made once per step."""
        if tokens not in self._by_tokens:
            assert self._token_slots is not None, "select() before the forward"
            token_slots = self._token_slots.expand(tokens).reshape(-1).numpy()
            self._by_tokens[tokens] = plan(token_slots, self.table.dtype, device)
        return self._by_tokens[tokens]

    def _hook(self, w: SlotWeights) -> Hook:
        """A forward hook adding (x @ A) @ B of each token's slot to a module's output.

        The update is computed in the slots' dtype and added before the one rounding to the output's dtype.
        """
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if w.embedding:
                step = self._plan(tuple(x.shape), x.device)
            else:  # hooks run hundreds of times a step: a linear layer's looks its plan up by its input's shape
                try:
                    step = self._plans[x.shape]
                except KeyError:
                    step = self._plans[x.shape] = self._plan(tuple(x.shape[:-1]), x.device)
            if step is None:
                return out
            flat_x = x.reshape(-1) if w.embedding else x.reshape(-1, x.shape[-1])
            if not w.embedding and flat_x.dtype != w.A.dtype:
                flat_x = flat_x.to(w.A.dtype)
            flat_out = out.view(-1, out.shape[-1])
            if isinstance(step, Spanned):
                A, B = w.span(step.span)
                h = A[flat_x] if w.embedding else torch.mm(flat_x, A)
                if step.mask is not None:
                    h.view(len(h), step.mask.shape[1], -1).mul_(step.mask)
                _add_product(flat_out, h, B)
                return out
            if len(step.rows):
                B = w.B[step.span] if step.span else w.B.index_select(0, step.slots)
                if w.embedding:
                    h = w.A[step.slot_of_position, :, flat_x[step.rows]].view(len(B), step.length, -1)
                else:
                    A = w.A[step.span] if step.span else w.A.index_select(0, step.slots)
                    h = torch.bmm(flat_x.index_select(0, step.rows).view(len(B), step.length, -1), A.transpose(1, 2))
                update = torch.bmm(h, B).view(-1, flat_out.shape[-1])
                if step.kept is not None:
                    update = update.index_select(0, step.kept)
                _add(flat_out, step.kept_rows, update)
            for slot, rows in step.alone:
                h = w.A[slot][:, flat_x[rows]].T if w.embedding else F.linear(flat_x.index_select(0, rows), w.A[slot])
                _add(flat_out, rows, h @ w.B[slot])
            return out
        return hook


class RowSlots:
    """The adapter slot of each row of a compiled decode step (-1: the base), shared by a tree's SlotUpdates."""

    def __init__(self, device: torch.device) -> None:
        self.index = torch.full((1,), -1, dtype=torch.long, device=device)


class SlotUpdate(torch.nn.Module):
    """`base` plus each row's own slot's update: (x @ A[slot]) @ B[slot], rows of slot -1 adding nothing.

    Fixed shapes (each row gathers its slot's A and B), so the update sits inside a compiled graph; computed in
    the slots' dtype and added before the output's one rounding, as the hooks do. Written as products summed,
    not matmuls: inductor fuses each into one loop reading the gathered slot (measured on a w8a16 SmolLM2 layer,
    one row, one thread, loaded, with A then laid out (slots, in, R): +9 us over the layer's 95 us, where
    gather-and-bmm cost +31 us).
    """

    def __init__(self, base: torch.nn.Module, weights: SlotWeights, rows: RowSlots) -> None:
        super().__init__()
        self.base, self.weights, self.rows = base, weights, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, w, index = self.base(x), self.weights, self.rows.index
        slot = index.clamp(min=0)
        if w.embedding:
            h = w.A[slot, :, x.reshape(-1)]
        else:
            h = (x.reshape(-1, 1, x.shape[-1]).to(w.A.dtype) * w.A[slot]).sum(2)
        h = torch.where((index >= 0)[:, None], h, 0.0)
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
        parent._modules[leaf] = SlotUpdate(parent.get_submodule(leaf), weights, rows)
    return root


def _add_product(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> None:
    """out += h @ B, rounded once to out's dtype (one addmm in place when the dtypes agree)."""
    if out.dtype == h.dtype:
        out.addmm_(h, B)
    else:
        out.copy_(torch.addmm(out.to(h.dtype), h, B))


def _add(out: torch.Tensor, rows: torch.Tensor, update: torch.Tensor) -> None:
    """out[rows] += update, rounded once to out's dtype."""
    if out.dtype == update.dtype:
        out.index_add_(0, rows, update)
    else:
        out.index_copy_(0, rows, (out.index_select(0, rows).to(update.dtype) + update).to(out.dtype))
