"""The exact merged-weights switch: a task's weights are built beside the base weights, never over them.

The base weights are never written. Applying a task builds its merged weights W = W0 + s * B @ A
in separate tensors, one fused addmm per weight, and points each targeted parameter at them;
going back points them at W0 again. Nothing is ever subtracted, so any sequence of switches leaves
bitwise the weights a single switch would, in any dtype. The most recently used tasks keep their
merged weights (`merged_cache_bytes`, at least the active task's), so switching among them copies
nothing; a switch to another task builds only the layers that task targets, in new buffers or, once
the cache is full, in those of the least recently used task. A build that is interrupted is never
pointed at: the model keeps running on complete weights.
"""
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch

from .checkpoint import Adapter
from .layers import weight_is_transposed
from .quant import dense_weight
from .registry import ByteLRU

Spec = tuple[tuple[str, float], ...]  # Tasks.normalize's form of a task or blend: sorted (task, weight)
Key = tuple[tuple[int, float], ...]  # what a spec's merged weights depend on: (registration number, weight)


class Target(NamedTuple):
    parameter: torch.nn.Parameter
    transposed: bool  # stored (in, out), as Conv1D and Embedding weights are
    base: torch.Tensor  # W0: the parameter's tensor before any switch, never written


class LowRank(NamedTuple):
    """W = W0 + alpha * B @ A, with B and A laid out like the weight."""
    B: torch.Tensor
    A: torch.Tensor
    alpha: float


class Merged(NamedTuple):
    spec: Spec
    weights: dict[str, torch.Tensor]  # module name -> its merged weight


class Switch:
    """Points a model's targeted parameters at merged weights (or back at the base weights).

    Not thread-safe by itself: `lora.tasks.Tasks` calls it under its lock.
    """

    def __init__(self, model: torch.nn.Module, merged_cache_bytes: int) -> None:
        self.model = model
        self.cache: ByteLRU[Key, Merged] = ByteLRU(merged_cache_bytes,
                                                   lambda m: sum(t.nbytes for t in m.weights.values()))
        self.active_key: Key | None = None
        self.active_spec: Spec | None = None
        self._targets: dict[str, Target] = {}
        self._pointed: set[str] = set()  # modules whose parameter holds a merged weight now

    def target(self, module_name: str) -> Target:
        """A module's parameter and base weight, looked up at its first switch (so before it ever changes)."""
        if module_name not in self._targets:
            module = self.model.get_submodule(module_name)
            weight = cast(torch.nn.Parameter, module.weight)
            self._targets[module_name] = Target(weight, weight_is_transposed(module), weight.data)
        return self._targets[module_name]

    def base_weight(self, module_name: str) -> torch.Tensor:
        """A module's base weight, whichever task is applied (de-quantized where packed: lora.quant)."""
        if module_name in self._targets:
            return self._targets[module_name].base
        return dense_weight(self.model.get_submodule(module_name))

    def plan(self, parts: Sequence[tuple[float, Adapter]]) -> dict[str, LowRank]:
        """What to add to each module's base weight for a weighted sum of adapters."""
        per_module: dict[str, list] = {}
        for weight, adapter in parts:
            for module_name, m in adapter.modules.items():
                per_module.setdefault(module_name, []).append((weight, m))
        plan = {}
        for module_name, items in per_module.items():
            if len(items) == 1:
                weight, m = items[0]
                B, A, alpha = m.B, m.A, m.scaling * weight
            else:  # weighted sum of deltas as one low-rank product: [w1 s1 B1 | w2 s2 B2] @ [A1; A2]
                B = torch.cat([m.B * (m.scaling * w) for w, m in items], dim=1)
                A, alpha = torch.cat([m.A for _, m in items], dim=0), 1.0
            # fp16 addmm is very slow on CPU; such weights are rebuilt in float32 (see _merge).
            target = self.target(module_name)
            base = target.base
            dtype = torch.float32 if base.dtype == torch.float16 and base.device.type == "cpu" else base.dtype
            B, A = B.to(dtype), A.to(dtype)
            plan[module_name] = LowRank(A.T, B.T, alpha) if target.transposed else LowRank(B, A, alpha)
        return plan

    def cached(self, key: Key) -> Merged | None:
        """The merged weights kept for a key (now the most recently used), or None."""
        return self.cache.get(key)

    @torch.no_grad()
    def build(self, key: Key, spec: Spec, plan: dict[str, LowRank]) -> Merged:
        """Merged weights for a plan, in the buffers of least recently used tasks where the cache is full.

        If the active task's buffers are taken, the model runs on the base weights until the next `point`.
        """
        need = sum(self.target(n).base.nbytes for n in plan)
        spare = {}
        for victim_key, victim in self.cache.evict(need):
            if victim_key == self.active_key:  # its buffers are about to be rewritten
                self.point(None, None)
            spare.update(victim.weights)
        weights = {n: spare.pop(n) if n in spare else torch.empty_like(self.target(n).base) for n in plan}
        for name, out in weights.items():
            _merge(out, self.target(name).base, plan[name])
        merged = Merged(spec, weights)
        self.cache.put(key, merged)
        return merged

    def point(self, key: Key | None, merged: Merged | None) -> None:
        """Point every parameter some task touched at `merged`'s tensor, or at its base weight (None: the base)."""
        weights = {} if merged is None else merged.weights
        for name in self._pointed | weights.keys():
            target = self._targets[name]
            target.parameter.data = weights.get(name, target.base)
        self._pointed = set(weights)
        self.active_key, self.active_spec = key, None if merged is None else merged.spec

    def forget(self, number: int) -> None:
        """Drop every merged weight built with a registration (the task was removed or replaced)."""
        for key in self.cache:
            if any(n == number for n, _ in key):
                self.cache.pop(key)


def _merge(out: torch.Tensor, base: torch.Tensor, step: LowRank) -> None:
    """out = base + alpha * B @ A, one fused addmm."""
    if step.B.dtype != base.dtype:  # float16 on CPU: rebuilt in float32 (see Switch.plan), rounded once
        out.copy_(torch.addmm(base.float(), step.B, step.A, alpha=step.alpha))
    else:
        torch.addmm(base, step.B, step.A, alpha=step.alpha, out=out)
