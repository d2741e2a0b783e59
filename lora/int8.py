"""The w8a16 layer: int8 weights with one bfloat16 scale per output row, on PyTorch's int8 weight-only CPU kernel.

Int8Linear holds the int8 values bitsandbytes' LLM.int8() holds (int8_rowwise) and runs bfloat16 activations through
aten._weight_int8pack_mm (what torchao's int8 weight-only config runs on CPU); it trains too (the weight frozen).
fuse_int8 runs layers of one input (q/k/v, gate/up) as one matmul over their rows, for the engine's lean forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 absmax per output row): bitsandbytes' int8_vectorwise_quant, so `int8` and
    `w8a16` hold equal int8 values. A weight is value * absmax / 127; an all-zero row gets absmax 0."""
    w = weight.detach().to(torch.float16)  # bitsandbytes rounds to float16 first
    absmax = w.abs().amax(dim=1).float()
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-30)).unsqueeze(1)).to(torch.int8)
    return q, absmax


def kernel_fits(q: torch.Tensor) -> bool:
    """Whether PyTorch's int8 weight-only kernel takes this int8 weight: on a CPU, with a multiple of 16 input
    features (torch 2.13's kernel crashes the process on others, 40 or 200, say)."""
    return q.device.type == "cpu" and q.shape[1] % 16 == 0


class _Int8MatMul(torch.autograd.Function):
    """x @ (q * scale).T with bfloat16 x; backward gives x its gradient (the weight is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        if kernel_fits(q):
            return torch.ops.aten._weight_int8pack_mm(x, q, scale)
        return x @ (q.to(x.dtype) * scale.unsqueeze(1)).T  # no int8 weight-only kernel for it: de-quantize

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, scale = ctx.saved_tensors
        return ((grad.float() * scale.float()) @ q.float()).to(grad.dtype), None, None


class Int8Linear(nn.Linear):
    """A frozen Linear holding int8 weights and one bfloat16 scale per output row (w8a16).

    Subclasses nn.Linear so LoRA layers and `all-linear` find it, as bitsandbytes' layers do.
    """

    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")  # no float weight is allocated
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        q, absmax = int8_rowwise(linear.weight)
        module.weight.data = q
        module.scale = (absmax / 127.0).to(torch.bfloat16)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.requires_grad or not kernel_fits(self.weight):
            out = _Int8MatMul.apply(flat, self.weight, self.scale)
        else:  # serving: the kernel itself (autograd.Function's bookkeeping costs as much as a small layer's matmul)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def fuse_int8(modules: list[nn.Module]) -> Int8Linear | None:
    """One Int8Linear whose output is `modules`' outputs side by side (layers that read one input: q/k/v, gate/up),
    or None where they cannot be one (not all bias-free Int8Linears of one input size that the kernel takes).

    Their weights and scales become views of its rows, so nothing is held twice. The kernel computes each output row
    alone (the row's dot product with the input, times its scale), so every value is bit for bit what each layer
    gives (checked: 1 to 512 input rows, 1 and 2 threads); one call instead of several saves kernel launches and casts.
    """
    first: Any = modules[0]
    if any(type(m) is not Int8Linear or m.bias is not None or m.in_features != first.in_features or
           not kernel_fits(m.weight) for m in modules):
        return None
    layers: list[Any] = modules
    fused = Int8Linear(first.in_features, sum(m.out_features for m in layers), bias=False, device="meta")
    fused.weight = nn.Parameter(stacked_rows([m.weight.data for m in layers]), requires_grad=False)
    fused.scale = stacked_rows([m.scale for m in layers])
    start = 0
    for m in layers:  # a layer that holds its rows already (fused before) keeps its tensors
        rows = slice(start, start + m.out_features)
        if m.weight.data_ptr() != fused.weight[rows].data_ptr():
            m.weight.data = fused.weight.data[rows]
        if m.scale.data_ptr() != fused.scale[rows].data_ptr():
            m.scale = fused.scale[rows]
        start = rows.stop
    return fused.eval()


def stacked_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """`parts` concatenated along rows: a view where they already lie so in one storage (fused before), else a copy
    (lora.int4.fuse_int4 stacks packed int4 rows with it too)."""
    first, at = parts[0], parts[0].data_ptr()
    for part in parts:
        if not part.is_contiguous() or part.data_ptr() != at or \
                part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return torch.cat(parts)
        at += part.numel() * part.element_size()
    return first.as_strided((sum(len(part) for part in parts), *first.shape[1:]), first.stride())
