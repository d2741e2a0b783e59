"""Faster float32 linear layers for eager decode steps on a CPU: prepacked weights for batches, one row split.

Measured (SmolLM2-135M float32, 1 thread, CPU time, a loaded 2-core AMD EPYC, torch 2.13): PyTorch's float32
`linear` reads weights at 6-18 GB/s for 2-16 rows, oneDNN's prepacked kernel (what inductor's freezing uses) is
1.3-2.9x faster there, and a whole engine decode step of 4, 8 and 16 sequences 1.56x, 1.29x and 1.43x. A packed
copy follows the weight its module holds now (exact switching points parameters at merged weights): it is keyed
by the weight's storage, and where that is not the base weight's (the base weights are never written) by the task
spec and registrations the merged weights were built for; a layer whose key changed is packed again (for SmolLM2
all layers take about 0.4 s, once per switch to other merged weights). Memory: one packed copy of every linear
weight, the head included (about 540 MB for SmolLM2 in float32).
One row (a single-stream decode step) is not packed (0.87x on a whole step): PyTorch runs a one-row `linear` on
one thread (2 threads read weights no faster than 1, about 11 GB/s here), so the weight's output rows are split
into one block per thread and run as one batched matmul, which torch spreads over its threads: 15-26 GB/s on 2
idle cores, each output still one dot product of a weight row with the input. It reads the weight in place (a
view), so it needs no copy and follows every switch by itself.
"""
from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import Any

import torch

PackKey = tuple[int, Hashable]  # the weight's storage, and what merged weights in it were built for (None: base)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacked weights run here: float32 on a CPU with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinears:
    """Every plain nn.Linear of a model, run on its packed weight inside `attached()`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules: list[torch.nn.Linear] = [  # plain layers only: not quantized ones, nor any already wrapped
            m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
        self._packed: dict[torch.nn.Linear, tuple[PackKey, torch.Tensor]] = {}
        self._base: dict[torch.nn.Linear, int] = {}  # each module's base weight storage, seen in a step on base weights
        self.packs = 0  # layers packed so far (a count to watch repacking)
        self.steps = 0  # forwards run on packed weights
        self.split_steps = 0  # one-row forwards split across threads
        self._splits: dict[int, list[tuple[torch.nn.Linear, Any]]] = {}  # per thread count: see _split_forwards

    @contextlib.contextmanager
    def attached(self, merged: Hashable, rows: int) -> Iterator[None]:
        """The model's linear layers run faster for one forward of `rows` rows: split across threads for one row,
        else on packed weights. `merged`: what the model's merged weights were built for (the task spec and
        registrations), or None when it runs on its base weights."""
        attached: list[torch.nn.Linear] = []
        threads = torch.get_num_threads()
        # The forwards go straight into (and out of) each module's __dict__: nn.Module's own __setattr__ and
        # __delattr__ cost about 2 ms a step over SmolLM2's 211 layers, a single stream's step being ~45 ms.
        try:  # packing can fail part way (out of memory): a packed forward left behind would outlive a switch
            if rows > 1:
                for m in self.modules:
                    m.__dict__["forward"] = self._forward(m, self._packed_weight(m, merged))
                    attached.append(m)
            elif threads > 1:
                for m, forward in self._split_forwards(threads):
                    m.__dict__["forward"] = forward
                    attached.append(m)
            self.steps += rows > 1
            self.split_steps += rows == 1 and bool(attached)
            yield
        finally:
            for m in attached:
                del m.__dict__["forward"]  # back to the class's forward

    def _split_forwards(self, threads: int) -> list[tuple[torch.nn.Linear, Any]]:
        """The layers a row can split into `threads` blocks, each with its split forward (made once)."""
        if threads not in self._splits:
            self._splits[threads] = [(m, self._split(m, threads)) for m in self.modules
                                     if m.bias is None and m.out_features % threads == 0]
        return self._splits[threads]

    def _packed_weight(self, module: torch.nn.Linear, merged: Hashable) -> torch.Tensor:
        storage = module.weight.data_ptr()
        if merged is None:
            self._base.setdefault(module, storage)
        key: PackKey = (storage, None if self._base.get(module) == storage else merged)
        held = self._packed.get(module)
        if held is None or held[0] != key:
            held = self._packed[module] = key, torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 4)
            self.packs += 1
        return held[1]

    @staticmethod
    def _split(module: torch.nn.Linear, blocks: int) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:  # x: one row, of any leading shape
            weight: Any = module._parameters["weight"]  # what the module holds now (getattr costs ~1 us a call)
            blocked = weight.view(blocks, -1, weight.shape[1]).transpose(1, 2)
            out = torch.bmm(x.reshape(1, 1, -1).expand(blocks, 1, -1), blocked)
            return out.view(*x.shape[:-1], weight.shape[0])
        return forward

    @staticmethod
    def _forward(module: torch.nn.Linear, packed: torch.Tensor) -> Any:
        bias = module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return forward
