"""A plain transformers model folder with one task folded into its weights, loadable without this package.

The fold is the one the task switch makes (lora/multitask.py): W = W0 + scaling * B @ A as a single addmm in
the weight's own dtype and layout, so the folder's logits are those of `MultiTaskModel` with the task active.
"""
import os
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ..checkpoint import Adapter, ModuleAdapter, atomic_directory, check_compatible
from ..errors import LoraError
from ..layers import weight_is_transposed


def merged_weight(base: torch.Tensor, m: ModuleAdapter, transposed: bool) -> torch.Tensor:
    """base + scaling * B @ A, one addmm, laid out like `base` (Conv1D and Embedding weights are (in, out))."""
    # float16 addmm is very slow on CPU: such weights are computed in float32 and rounded once, as the switch does
    dtype = torch.float32 if base.dtype == torch.float16 and base.device.type == "cpu" else base.dtype
    A, B = m.A.to(base.device, dtype), m.B.to(base.device, dtype)
    first, second = (A.T, B.T) if transposed else (B, A)
    return torch.addmm(base.to(dtype), first, second, alpha=m.scaling).to(base.dtype)


def weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def refuse_tied(model: PreTrainedModel, adapter: Adapter) -> None:
    """A LoraError if the adapter changes a weight the input embeddings and the output head share."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    for name in adapter.modules:
        w = weight(model.get_submodule(name))
        if head is not None and weight(head) is w and weight(embeddings) is w:
            raise LoraError(f"{adapter.path} adapts {name}, whose weight the input embeddings and the output head "
                            f"share in this model; a merge would change both, re-train without {name}")


@torch.no_grad()
def merge_into(model: PreTrainedModel, adapter: Adapter) -> PreTrainedModel:
    """Fold `adapter` into `model`'s weights in place (check_compatible first); returns the model."""
    check_compatible(adapter, model)
    refuse_tied(model, adapter)
    for name, m in adapter.modules.items():
        module = model.get_submodule(name)
        weight(module).data = merged_weight(weight(module).data, m, weight_is_transposed(module))
    return model


def write_merged(model: PreTrainedModel, tokenizer: object, adapter: Adapter, out: str) -> str:
    """Write `model` with `adapter` folded in as a transformers folder at `out` (replaced atomically).

    The folder holds model.safetensors, config.json, generation_config.json and the tokenizer with its chat
    template: `AutoModelForCausalLM.from_pretrained(out)` and vLLM load it as they load any model. `model` is
    changed (the task is folded into it); load a fresh copy to keep the base.
    """
    save = getattr(tokenizer, "save_pretrained", None)
    if save is None:
        raise LoraError("pass the base model's tokenizer: the merged folder needs it to be usable on its own")
    merge_into(model, adapter)
    try:
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
            save(tmp)
    except OSError as e:
        raise LoraError(f"cannot write the merged model to {out}: {e.strerror or e}; pass another --out") from None
    return os.fspath(out)
