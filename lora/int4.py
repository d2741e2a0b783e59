"""The w4a16 layer: int4 weights in Q4_1 groups of 32 on PyTorch's int4 CPU kernel, from float weights or GGUF blocks.

llama.cpp's Q4_1 block holds 32 weights as 4-bit q in 0..15 with a float16 scale d and minimum m: w = d*q + m.
PyTorch's CPU kernel aten._weight_int4pack_mm_for_cpu (torchao's int4 weight-only layout) takes the same shape:
groups of 32 along the input dimension, w = (q - 8)*scale + zero with bfloat16 scale and zero, so scale = d and
zero = m + 8d. Int4Linear holds the kernel's packed q (uint8, N x K/2, in the kernel's own order) and a bfloat16
(K/32, N, 2) tensor of scales and zeros; activations run in bfloat16. gguf_linears reads a GGUF's Q4_1 tensors
into such layers keeping their 4-bit values as they are (never de-quantized): only d and m are rounded to bfloat16.
"""
from __future__ import annotations

import functools
from typing import Any

import gguf
import numpy as np
import torch
import torch.nn as nn

from .errors import LoraError
from .gguf_layout import layout_of, rope_restore
from .int8 import stacked_rows

GROUP = 32  # weights per group along the input dimension (Q4_1's block)
ROWS = 16  # the kernel packs output rows in multiples of 16
Q4_1_BYTES = 20  # a Q4_1 block: float16 d, float16 m, 16 bytes of 32 4-bit values


def fits(in_features: int, out_features: int) -> bool:
    """Whether the int4 kernel takes a Linear of this shape (in_features in whole groups, out_features in 16s)."""
    return in_features % GROUP == 0 and out_features % ROWS == 0 and in_features > 0 and out_features > 0


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros) of q (N, K) in 0..15 and float scale, zero (N, K/32)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 8)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of packed bytes, flat, each byte's low one first."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten()


@functools.lru_cache(maxsize=32)
def _packed_order(out_features: int, in_features: int) -> torch.Tensor:
    """For each 4-bit slot of a packed (N, K) weight, the flat index (n*K + k) of the q it holds. The packed order
    is the kernel's own (it differs between CPUs), so it is read off the packing itself: packing q = the index's
    4-bit digits one at a time puts each digit in that q's slot."""
    index = torch.arange(out_features * in_features, dtype=torch.int64).reshape(out_features, in_features)
    order = torch.zeros(out_features * in_features, dtype=torch.int64)
    for shift in range(0, max(1, int(index.max()).bit_length()), 4):
        digits = ((index >> shift) & 15).to(torch.int32)
        order |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 8)).long() << shift
    return order.to(torch.int32)  # kept per shape: half the bytes


@functools.lru_cache(maxsize=32)
def _stackable(rows: tuple[int, ...], in_features: int) -> bool:
    """Whether layers of these output rows, packed each, stack into the packing of their rows stacked. The kernel
    packs rows in blocks (of 64 here), so it holds where each layer but the last fills whole blocks; read off the
    packing itself, as _packed_order is (the blocks may differ between CPUs)."""
    seeded = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (sum(rows), in_features), dtype=torch.int32, generator=seeded)
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(part.contiguous(), 8) for part in probe.split(rows)]
    return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 8), torch.cat(parts))


def q4_1_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a float (N, K) weight: per group of 32 its minimum and (max - min)/15 as in llama.cpp's
    quantize_row_q4_1, q rounded against the bfloat16 scale and zero the kernel reads (so it is their best q)."""
    w = weight.detach().float().reshape(weight.shape[0], -1, GROUP)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((w - zero.unsqueeze(-1)) * inverse.unsqueeze(-1) + 8).clamp(0, 15).to(torch.uint8)
    return q.reshape(weight.shape), scale, zero


class Int4Linear(nn.Linear):
    """A frozen Linear holding int4 weights in groups of 32 with a bfloat16 scale and zero each (w4a16), run by
    PyTorch's int4 CPU kernel. For serving: it has no backward (train over nf4 or w8a16).

    Subclasses nn.Linear so LoRA layers and `all-linear` find it, as lora.int8's Int8Linear does.
    """

    scales_and_zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None) -> None:
        if not fits(in_features, out_features):
            raise LoraError(f"the int4 kernel takes in_features in multiples of {GROUP} and out_features in "
                            f"multiples of {ROWS}, not {in_features} x {out_features}; keep this layer float")
        super().__init__(in_features, out_features, bias=False, device="meta")  # no float weight is allocated
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // GROUP, out_features, 2, dtype=torch.bfloat16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)

    @classmethod
    def from_groups(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bias: torch.Tensor | None = None) -> Int4Linear:
        """The layer of q (N, K) in 0..15, w = (q - 8)*scale + zero with scale, zero (N, K/32) per group."""
        module = cls(q.shape[1], q.shape[0], bias is not None)
        module.weight.data, module.scales_and_zeros = _pack(q, scale, zero)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """`linear` quantized in Q4_1 groups (see q4_1_groups); its bias is kept as it is."""
        return cls.from_groups(*q4_1_groups(linear.weight), bias=linear.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> Int4Linear:
        module = super()._apply(fn, recurse)
        self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)  # model.to(dtype) casts it: keep the kernel's
        if self.weight.device.type != "cpu":
            raise LoraError(f"w4a16 runs on PyTorch's int4 CPU kernel only, not on {self.weight.device}; keep the "
                            "model on the CPU, or use --quantize int8 (w8a16) or nf4 there")
        return module

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight these groups stand for (q read back in the kernel's packed order)."""
        q = torch.empty(self.out_features * self.in_features)
        q[_packed_order(self.out_features, self.in_features)] = _nibbles(self.weight).float()
        q = q.reshape(self.out_features, self.in_features)
        scale, zero = (self.scales_and_zeros[..., i].T.float().repeat_interleave(GROUP, dim=1) for i in (0, 1))
        return (q - 8) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if flat.requires_grad:
            raise LoraError("w4a16 layers have no backward: they are for serving; train the adapter over nf4 or "
                            "w8a16 (or a float base) and serve it over w4a16")
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def fuse_int4(modules: list[nn.Module]) -> Int4Linear | None:
    """One Int4Linear whose output is `modules`' outputs side by side (layers that read one input: q/k/v, gate/up),
    or None where they cannot be one (not all bias-free Int4Linears of one input size, or rows the kernel packs
    across layers' bounds: see _stackable).

    The kernel computes each output row alone, so where the layers' packed rows stacked are the stacked layer's
    packing every value is bit for bit what each layer gives (checked in tests). The layers' weights
    become views of its rows (nothing is held twice); its scales and zeros are a copy, since the kernel reads a
    column slice of them wrongly (it takes them as contiguous), and they are an eighth of the packed bytes.
    """
    first: Any = modules[0]
    if any(type(m) is not Int4Linear or m.bias is not None or m.in_features != first.in_features for m in modules) \
            or not _stackable(tuple(m.out_features for m in modules), first.in_features):
        return None
    layers: list[Any] = modules
    fused = Int4Linear(first.in_features, sum(m.out_features for m in layers), bias=False, device="meta")
    fused.weight = nn.Parameter(stacked_rows([m.weight.data for m in layers]), requires_grad=False)
    fused.scales_and_zeros = first.scales_and_zeros if len(layers) == 1 else \
        torch.cat([m.scales_and_zeros for m in layers], dim=1)
    start = 0
    for m in layers:  # a layer that holds its rows already (fused before) keeps its tensor
        rows = slice(start, start + m.out_features)
        if m.weight.data_ptr() != fused.weight[rows].data_ptr():
            m.weight.data = fused.weight.data[rows]
        start = rows.stop
    return fused.eval()


def q4_1_blocks(tensor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a GGUF Q4_1 tensor (gguf.ReaderTensor) as stored: q (N, K) uint8 in 0..15, and
    scale = d, zero = m + 8d (N, K/32) computed in float32 from the block's float16 d and m."""
    rows = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, Q4_1_BYTES)
    d = torch.from_numpy(rows[..., 0:2].copy().view(np.float16)[..., 0]).float()
    m = torch.from_numpy(rows[..., 2:4].copy().view(np.float16)[..., 0]).float()
    packed = torch.from_numpy(rows[..., 4:].copy())  # element j in the low nibble of byte j, j + 16 in the high one
    q = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(rows.shape[0], -1)
    return q, d, m + 8 * d


def gguf_linears(gguf_path: str, model: nn.Module, names: list[str]) -> dict[str, Int4Linear]:
    """{module name: Int4Linear} for each of `names` whose weight the GGUF file holds in Q4_1, its blocks kept
    (llama.cpp's q/k row reordering undone on q, d and m); the others are not there (quantize them from float).
    A LoraError where a tensor's shape is not the module's: the file and the model do not belong together."""
    layout = layout_of(getattr(model, "config", None))
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    found = {}
    for name in names:
        tensor = tensors.get(layout.tensor_name(name))
        if tensor is None or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        module: Any = model.get_submodule(name)
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF lists dimensions innermost first
        if shape != (module.out_features, module.in_features):
            raise LoraError(f"{gguf_path}: {tensor.name} is {shape[0]} x {shape[1]} but {name} is "
                            f"{module.out_features} x {module.in_features}; the GGUF and the model folder do not "
                            "belong together (delete the prepared folder to have it written again)")
        if module.bias is not None or not fits(module.in_features, module.out_features):
            continue
        q, scale, zero = q4_1_blocks(tensor)
        heads = layout.rope_heads(name)
        if heads is not None:
            q, scale, zero = (rope_restore(t, heads) for t in (q, scale, zero))
        found[name] = Int4Linear.from_groups(q, scale, zero)
    return found
