"""Module surgery: find the modules `target_modules` names and wrap them in LoRA layers."""
import sys
from collections.abc import Mapping

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text
from .layers import SUPPORTED, LoraLayer
from .patterns import check_pattern, fullmatch, is_regex, pattern_value
from .peft_format import check_rank
from .quant import dequantize_model, is_quantized


def read_target_modules(path: str) -> list[str]:
    """The seed's target_modules.txt: one module name (or suffix, or regex) per line."""
    text = read_text(path, what="target modules file", max_bytes=MAX_JSON_BYTES)
    lines = [line.strip() for line in text.split("\n")]
    targets = [line for line in lines if line and not line.startswith("#")]
    if not targets:
        raise LoraError(f"target modules file {path} is empty; list module names such as q_proj and v_proj, "
                        "one per line")
    return targets


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules to wrap, in model order.

    Accepts what PEFT users write: a list of exact names or name suffixes ("q_proj" matches every
    layer's q_proj; entries with regex characters are full-match regexes), a single regex string,
    or "all-linear" (every Linear/Conv1D except the output head).
    """
    modules = dict(model.named_modules())
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        output_embeddings = getattr(model, "get_output_embeddings", None)
        head = output_embeddings() if callable(output_embeddings) else None
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
        if not names:
            raise LoraError("target_modules='all-linear' matched no Linear or Conv1D layer in this model")
        return names
    if isinstance(target_modules, str):
        target_modules = [target_modules]

    names, unmatched = [], []
    for target in target_modules:
        if is_regex(target):
            check_pattern(target, f"target module pattern {target!r}")
            hits = [n for n in modules if n and fullmatch(target, n)]
        else:
            hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            unmatched.append(target)
        names += [h for h in hits if h not in names]
    if unmatched:
        sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, SUPPORTED)}))
        raise LoraError(f"target module(s) {', '.join(map(repr, unmatched))} match nothing in "
                        f"{type(model).__name__}; module names that can take LoRA here: {sample}")
    for name in names:
        module = modules[name]
        if isinstance(module, LoraLayer):
            raise LoraError(f"module {name} already has a LoRA adapter; load a fresh base model first")
        if not isinstance(module, SUPPORTED):
            raise LoraError(f"module {name} is a {type(module).__name__}; LoRA wraps only Linear, Conv1D and "
                            f"Embedding layers, so target the layers inside it (e.g. {name}.q_proj)")
    order = {n: i for i, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, target_modules: str | list[str], r: int = 8, alpha: float = 16, dropout: float = 0.0,
           rslora: bool = False, rank_pattern: Mapping[str, int] | None = None,
           alpha_pattern: Mapping[str, float] | None = None) -> list[str]:
    """Wrap the targeted modules in LoRA layers and make only LoRA parameters trainable.

    Works on a model on the meta device. Returns the wrapped module names.
    """
    check_rank(r, "LoRA rank r")
    names = find_targets(model, target_modules)
    wrap(model, {n: pattern_value(rank_pattern, n, r) for n in names},
         {n: pattern_value(alpha_pattern, n, alpha) for n in names}, dropout, rslora)
    return names


def wrap(model: nn.Module, ranks: dict[str, int], alphas: dict[str, float], dropout: float = 0.0,
         rslora: bool = False) -> None:
    """Wrap each module named in `ranks` in a LoraLayer of its rank and alpha; only LoRA parameters stay trainable.

    The names come from find_targets, which has checked that each module can take LoRA.
    """
    for name, rank in ranks.items():
        set_submodule(model, name, LoraLayer(model.get_submodule(name), rank, alphas[name], dropout, rslora))
    mark_only_lora_as_trainable(model)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """{module name: LoraLayer} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A" in name or ".lora_B" in name or name.startswith("lora_")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the LoRA layers: a plain model again.

    Packed weights cannot take an adapter: on a quantized base (lora.quant) every quantized layer is first
    replaced by a float copy of its de-quantized weights, and a note on stderr says so. The result is then a
    float model: the quantized base's values plus the adapters, never the original float weights.
    """
    layers = lora_layers(model)
    if any(is_quantized(layer.base_layer) for layer in layers.values()):
        names = dequantize_model(model)
        print(f"note: the base model is quantized; merging into a de-quantized float copy of its {len(names)} "
              "quantized layers (lora.quant.dequantize_model)", file=sys.stderr)
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.merged())
    return model
