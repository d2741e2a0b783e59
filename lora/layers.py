"""LoRA math: a layer that adds a low-rank update to a Linear, Conv1D or Embedding, and merges itself.

    y = base(x) + scaling * B(A(dropout(x))),   scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA)

A is (r, in) and B is (out, r) for every wrapped type, the convention PEFT's files use; only the
base weight's layout differs (Conv1D and Embedding store it transposed), which `delta_weight` handles.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)


def lora_scaling(r, alpha, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


def in_out_features(module):
    """(in, out) of the map a module computes, whatever its weight layout."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"LoRA wraps {', '.join(t.__name__ for t in SUPPORTED)}, not {type(module).__name__}")


def weight_is_transposed(module):
    """True where the weight is stored (in, out) rather than nn.Linear's (out, in): PEFT's fan_in_fan_out."""
    return isinstance(module, (Conv1D, nn.Embedding))


def delta_weight(A, B, scaling, transposed):
    """The dense update scaling * B @ A, laid out like the base weight it is added to."""
    delta = (B @ A) * scaling
    return delta.T if transposed else delta


def lora_update(x, A, B, scaling, embedding=False):
    """scaling * B(A(x)) for inputs x (token ids when the base is an Embedding)."""
    h = F.embedding(x, A.T) if embedding else x.to(A.dtype) @ A.T
    return (h @ B.T) * scaling


class LoraLayer(nn.Module):
    """Wraps a base module; the base weight is shared, never copied, and stays frozen."""

    def __init__(self, base_layer, r=8, alpha=16, dropout=0.0, rslora=False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        in_features, out_features = in_out_features(base_layer)
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.use_rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.embedding = isinstance(base_layer, nn.Embedding)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 and not self.embedding else nn.Identity()
        # Adapters train in float32 even on a bfloat16/float16 base, as mixed-precision training does.
        dtype = torch.float64 if base_layer.weight.dtype == torch.float64 else torch.float32
        kw = dict(device=base_layer.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0, so a fresh adapter changes nothing

    def forward(self, x):
        out = self.base_layer(x)
        update = lora_update(self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling, self.embedding)
        return out + update.to(out.dtype)

    def delta_weight(self):
        return delta_weight(self.lora_A, self.lora_B, self.scaling, weight_is_transposed(self.base_layer))

    @torch.no_grad()
    def merged(self):
        """The base module with this adapter folded into its weight (for export; runs at base speed)."""
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def extra_repr(self):
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"

