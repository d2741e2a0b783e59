"""LoRA math: a layer that adds a low-rank update to a Linear, Conv1D or Embedding, and merges itself.

    y = base(x) + scaling * B(A(dropout(x))),   scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA)

A is (r, in) and B is (out, r) for every wrapped type, the convention PEFT's files use; only the
base weight's layout differs (Conv1D and Embedding store it transposed), which `delta_weight` handles.
Quantized Linears (bitsandbytes' Linear4bit/Linear8bitLt, lora.int8's Int8Linear) subclass nn.Linear and
are wrapped the same way; their packed weights cannot take a merged adapter.
"""
import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .errors import LoraError
from .peft_format import check_rank, lora_scaling

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the map a module computes, whatever its weight layout."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"LoRA wraps {', '.join(t.__name__ for t in SUPPORTED)}, not {type(module).__name__}")


def weight_is_transposed(module: nn.Module) -> bool:
    """True where the weight is stored (in, out) rather than nn.Linear's (out, in): PEFT's fan_in_fan_out."""
    return isinstance(module, (Conv1D, nn.Embedding))


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """The dense update scaling * B @ A, laid out like the base weight it is added to."""
    delta = (B @ A) * scaling
    return delta.T if transposed else delta


def lora_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                embedding: bool = False) -> torch.Tensor:
    """scaling * B(A(x)) for inputs x (token ids when the base is an Embedding)."""
    h = F.embedding(x, A.T) if embedding else x.to(A.dtype) @ A.T
    return (h @ B.T) * scaling


class CastInputUpdate(torch.autograd.Function):
    """lora_update(x, A, B, scaling).to(out_dtype) for x in another dtype than A (a bfloat16 base under a
    float32 adapter), with autograd's values and gradients (bit for bit on the shapes tests/test_layers.py
    checks) in less memory: autograd over lora_update keeps a float32 copy of x per LoRA layer for A's
    gradient (q, k and v each one of the same input); this keeps x itself and casts it again in backward,
    which gives the same copy, and scales in place instead of into new float32 tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                out_dtype: torch.dtype) -> torch.Tensor:
        h = x.to(A.dtype) @ A.T
        ctx.save_for_backward(x, A, B, h)
        ctx.scaling = scaling
        return (h @ B.T).mul_(scaling).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, h = ctx.saved_tensors
        # autograd's matmul folds leading dims into rows and runs mm; these are its mm backward formulas
        g = grad.to(A.dtype, copy=True).mul_(ctx.scaling).flatten(0, -2)
        grad_h = g.mm(B)
        grad_x = grad_h.mm(A).to(x.dtype).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_A = grad_h.t().mm(x.to(A.dtype).flatten(0, -2)) if ctx.needs_input_grad[1] else None
        grad_B = g.t().mm(h.flatten(0, -2)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, None, None


class LoraLayer(nn.Module):
    """Wraps a base module; the base weight is shared, never copied, and stays frozen."""

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        check_rank(r, "LoRA rank r")
        in_features, out_features = in_out_features(base_layer)
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.use_rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.embedding = isinstance(base_layer, nn.Embedding)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 and not self.embedding else nn.Identity()
        # Adapters train in float32 even on a bfloat16/float16 base, as mixed-precision training does.
        weight = cast(torch.Tensor, base_layer.weight)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0, so a fresh adapter changes nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        x = self.lora_dropout(x)
        if self.embedding or x.dtype == self.lora_A.dtype:
            return out + lora_update(x, self.lora_A, self.lora_B, self.scaling, self.embedding).to(out.dtype)
        return out + CastInputUpdate.apply(x, self.lora_A, self.lora_B, self.scaling, out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A, self.lora_B, self.scaling, weight_is_transposed(self.base_layer))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base module with this adapter folded into its weight (for export; runs at base speed)."""
        weight = cast(torch.Tensor, self.base_layer.weight)
        if not weight.is_floating_point():
            raise LoraError(f"cannot merge a LoRA adapter into a quantized {type(self.base_layer).__name__}: its "
                            f"packed {weight.dtype} weights cannot take a merged task; de-quantize the base first "
                            "(lora.quant.dequantize_model) or keep the adapter unmerged")
        weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"

