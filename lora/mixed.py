"""Mixed-task batches: over the base weights, each token gets the low-rank update of its own task."""
import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import Adapter

Hook = Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]
Part = tuple[float, Adapter]  # (weight, adapter): one term of a blend


class MixedAdapters:
    """Forward hooks adding to each token the low-rank update of its own task, over the base weights.

    Per adapted module every task's A and B are stacked along the rank, in `dtype` (float32 by default, so
    bfloat16 and float16 models round the update once, not per factor), and a (tasks + 1, rank) table holds
    each task's scaling on its own rank block: selecting a table row per token keeps that task's update and
    zeroes the others, in three kernels per module however many tasks share the batch.
    """

    def __init__(self, model: torch.nn.Module, tasks: Sequence[str], adapters: Sequence[Adapter | Sequence[Part]],
                 dtype: torch.dtype = torch.float32) -> None:
        """adapters[i] is tasks[i]'s adapter, or for a blend its (weight, adapter) parts."""
        self.tasks = tuple(tasks)
        self.index: torch.Tensor | None = None
        per_module: dict[str, list] = {}
        for i, parts in enumerate(adapters, 1):
            for weight, adapter in [(1.0, parts)] if isinstance(parts, Adapter) else parts:
                for name, m in adapter.modules.items():
                    per_module.setdefault(name, []).append((i, weight * m.scaling, m))
        self._hooks: list[tuple[torch.nn.Module, Hook]] = []
        for name, items in per_module.items():
            A = torch.cat([m.A.to(dtype) for _, _, m in items]).T  # (in, total rank)
            B = torch.cat([m.B.to(dtype) for _, _, m in items], dim=1).T  # (total rank, out)
            scales = torch.zeros(len(self.tasks) + 1, A.shape[1], device=A.device, dtype=dtype)
            start = 0
            for i, scale, m in items:
                scales[i, start:start + m.A.shape[0]] = scale
                start += m.A.shape[0]
            module = model.get_submodule(name)
            self._hooks.append((module, self._hook(A, B, scales, isinstance(module, torch.nn.Embedding))))

    def select(self, index: torch.Tensor) -> None:
        """Which task each token (batch, seq) or row (batch, 1) uses from now on: 0 the base, i + 1 tasks[i]
        (a 0-d index: every token)."""
        self.index = index

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks on the model for one forward (or one `with` block), and never left behind."""
        handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, embedding: bool) -> Hook:
        """A forward hook adding ((x @ A) * scales[index]) @ B to a module's output.

        Row 0 of scales, the base model, is all zero. The update is computed in A's dtype and added before
        the one rounding to the output's dtype.
        """
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            h = F.embedding(x, A) if embedding else x.to(A.dtype) @ A
            update = (h * scales[self.index]) @ B
            return out.add_(update) if out.dtype == update.dtype else (out.to(update.dtype) + update).to(out.dtype)
        return hook
