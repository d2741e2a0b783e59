"""Prepacked weights for batched decode steps on a CPU: each linear layer's weight in oneDNN's blocked layout.

Measured (SmolLM2-135M float32, 1 thread, CPU time, a loaded 2-core AMD EPYC, torch 2.13): PyTorch's float32
`linear` reads weights at 6-18 GB/s for 2-16 rows, oneDNN's prepacked kernel (what inductor's freezing uses) is
1.3-2.9x faster there, and a whole engine decode step of 4, 8 and 16 sequences 1.56x, 1.29x and 1.43x; for one
row it is slower (a whole single-stream step 0.87x), so steps of one row keep `linear`. Prompt chunks keep it too.
A packed copy follows the weight its module holds now (exact switching points parameters at merged weights): it
is keyed by the weight's storage, and where that is not the base weight's (the base weights are never written)
by the task spec and registrations the merged weights were built for; a layer whose key changed is packed again
(for SmolLM2 all layers take about 0.4 s, once per switch to other merged weights).
Memory: one packed copy of every linear weight, the head included (about 540 MB for SmolLM2 in float32).
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

    @contextlib.contextmanager
    def attached(self, merged: Hashable) -> Iterator[None]:
        """The model's linear layers run on packed weights for one forward. `merged`: what the model's merged
        weights were built for (the task spec and registrations), or None when it runs on its base weights."""
        attached: list[torch.nn.Linear] = []
        try:  # packing can fail part way (out of memory): a packed forward left behind would outlive a switch
            for m in self.modules:
                m.forward = self._forward(m, self._packed_weight(m, merged))  # type: ignore[method-assign]
                attached.append(m)
            self.steps += 1
            yield
        finally:
            for m in attached:
                del m.forward  # back to the class's forward

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
    def _forward(module: torch.nn.Linear, packed: torch.Tensor) -> Any:
        bias = module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return forward
