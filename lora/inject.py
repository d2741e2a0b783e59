"""Module surgery: find the modules `target_modules` names and wrap them in LoRA layers."""
import re

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text
from .layers import SUPPORTED, LoraLayer

REGEX_CHARS = set("*+?[]()|^$\\")


def _is_regex(pattern):
    return any(c in REGEX_CHARS for c in pattern)


def _matches_pattern(key, name):
    """PEFT's rank_pattern/alpha_pattern rule: the key matches the whole name or a dotted suffix of it."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def pattern_value(patterns, name, default):
    for key, value in (patterns or {}).items():
        if _matches_pattern(key, name):
            return value
    return default


def read_target_modules(path):
    """The seed's target_modules.txt: one module name (or suffix, or regex) per line."""
    lines = [line.strip() for line in read_text(path, what="target modules file", max_bytes=MAX_JSON_BYTES).split("\n")]
    targets = [line for line in lines if line and not line.startswith("#")]
    if not targets:
        raise LoraError(f"target modules file {path} is empty; list module names such as q_proj and v_proj, one per line")
    return targets


def find_targets(model, target_modules):
    """Names of the modules to wrap, in model order.

    Accepts what PEFT users write: a list of exact names or name suffixes ("q_proj" matches every
    layer's q_proj; entries with regex characters are full-match regexes), a single regex string,
    or "all-linear" (every Linear/Conv1D except the output head).
    """
    modules = dict(model.named_modules())
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
        if not names:
            raise LoraError("target_modules='all-linear' matched no Linear or Conv1D layer in this model")
        return names
    if isinstance(target_modules, str):
        target_modules = [target_modules]

    names, unmatched = [], []
    for target in target_modules:
        if _is_regex(target):
            try:
                hits = [n for n in modules if n and re.fullmatch(target, n)]
            except re.error as e:
                raise LoraError(f"target module pattern {target!r} is not a valid regex ({e})") from None
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
    return sorted(names, key=order.get)


def set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model, target_modules, r=8, alpha=16, dropout=0.0, rslora=False, rank_pattern=None, alpha_pattern=None):
    """Wrap the targeted modules in LoRA layers and make only LoRA parameters trainable.

    Works on a model on the meta device. Returns the wrapped module names.
    """
    if not isinstance(r, int) or r <= 0:
        raise LoraError(f"LoRA rank must be a positive integer, got {r!r}; try r=8")
    names = find_targets(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        rank = pattern_value(rank_pattern, name, r)
        set_submodule(model, name, LoraLayer(module, rank, pattern_value(alpha_pattern, name, alpha), dropout, rslora))
    mark_only_lora_as_trainable(model)
    return names


def lora_layers(model):
    """{module name: LoraLayer} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def mark_only_lora_as_trainable(model):
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A" in name or ".lora_B" in name or name.startswith("lora_")


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n]


def merge_and_unload(model):
    """Fold every adapter into its base weight and remove the LoRA layers: a plain model again."""
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.merged())
    return model
