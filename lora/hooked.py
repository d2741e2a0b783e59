"""A task (or a blend of tasks) applied by forward hooks: for bases whose packed weights cannot take a merge."""
import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import Adapter

Hook = Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]
Part = tuple[float, Adapter]  # (weight, adapter): one term of a blend


class HookedUpdate:
    """Forward hooks adding sum_i w_i * s_i * B_i @ A_i @ x to each adapted module's output, for every token.

    Per module the parts' A and B are stacked along the rank in `dtype` (float32 by default, so bfloat16 and
    float16 models round the update once), with each part's weight times scaling on its own rank block.
    """

    def __init__(self, model: torch.nn.Module, parts: Sequence[Part], dtype: torch.dtype = torch.float32) -> None:
        per_module: dict[str, list[tuple[float, Adapter, str]]] = {}
        for weight, adapter in parts:
            for name in adapter.modules:
                per_module.setdefault(name, []).append((weight, adapter, name))
        self._hooks: list[tuple[torch.nn.Module, Hook]] = []
        for name, items in per_module.items():
            modules = [adapter.modules[n] for _, adapter, n in items]
            A = torch.cat([m.A.to(dtype) for m in modules]).T  # (in, total rank)
            B = torch.cat([m.B.to(dtype) for m in modules], dim=1).T  # (total rank, out)
            scale = torch.cat([torch.full((m.A.shape[0],), weight * m.scaling, dtype=dtype, device=A.device)
                               for (weight, _, _), m in zip(items, modules)])
            module = model.get_submodule(name)
            self._hooks.append((module, _hook(A, B, scale, isinstance(module, torch.nn.Embedding))))

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks on the model for as long as the `with` block lasts, and never left behind."""
        handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _hook(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, embedding: bool) -> Hook:
    """A forward hook adding ((x @ A) * scale) @ B, computed in A's dtype, before the output's one rounding."""
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        h = F.embedding(x, A) if embedding else x.to(A.dtype) @ A
        update = (h * scale) @ B
        return out.add_(update) if out.dtype == update.dtype else (out.to(update.dtype) + update).to(out.dtype)
    return hook
