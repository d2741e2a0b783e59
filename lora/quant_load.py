"""Loading a base model quantized as it is read: tensor by tensor from its safetensors files, never whole in float.

The model is built with its parameters on the meta device (no memory; buffers such as rotary frequencies are
computed as usual), each tensor is read from the file on its own (pread, not mmap: the file's pages do not stay
in the process), cast to the model's dtype as transformers' loader does, and a Linear quantize_model would
replace is quantized as soon as its weights are in: the float copy of one layer at a time is all that exists.
The result equals transformers' from_pretrained followed by quantize_model (the same quantized bytes and logits).
With `gguf_file` (w4a16 over the default model: its packaged Q4_1 GGUF) the layers that file holds in Q4_1 take its
blocks as they are (lora.int4.gguf_linears) and their float weights are not read at all.
"""
from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .errors import LoraError
from .int4 import gguf_linears
from .quant import Quantization, mark_quantized, output_head, quantizable_names, quantize_linear

try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class NotReadable(Exception):
    """This model cannot be quantized as it is read (the message says why): load it whole, then quantize_model."""


def safetensors_files(path: str) -> list[str]:
    """The model folder's safetensors weight files, or a LoraError: pickled weights are never read here."""
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return [os.path.join(path, SINGLE_FILE)]
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        try:
            with open(os.path.join(path, INDEX_FILE)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LoraError(f"{os.path.join(path, INDEX_FILE)} is not a safetensors index ({e}); save the model "
                            "again with save_pretrained") from None
        return [os.path.join(path, shard) for shard in shards]
    pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    found = f" (it has {', '.join(pickled)}: pickle, which can run code when read)" if pickled else ""
    raise LoraError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}{found}; --quantize reads safetensors only: "
                    "convert the model once (transformers' from_pretrained, then save_pretrained writes safetensors)")


def release_freed() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc keeps freed
    blocks under 32 MiB for reuse, and the float copies of layers freed between the small quantized tensors kept
    would otherwise stay in the process: loading the 1B shape in nf4 peaked at 2.4 GiB without it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextmanager
def _open(file: str) -> Iterator[Any]:
    from safetensors import SafetensorError, safe_open

    try:
        try:
            handle = safe_open(file, framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors before 0.8 has no backend: it maps the file
            handle = safe_open(file, framework="pt", device="cpu")
    except (OSError, SafetensorError) as e:
        raise LoraError(f"cannot read {file} as safetensors ({e}); save the model again with save_pretrained") from None
    with handle as f:
        yield f


def _keys(files: list[str]) -> dict[str, str]:
    """Each tensor's name -> the file holding it (headers only are read)."""
    where: dict[str, str] = {}
    for file in files:
        with _open(file) as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device (accelerate's init_empty_weights): nothing
    is allocated for them; buffers are left alone, since those not in the checkpoint are computed at build."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(path: str, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.name_or_path = path  # as from_pretrained leaves it
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (RuntimeError, NotImplementedError) as e:  # its __init__ computes with a parameter's values
        raise NotReadable(f"{type(e).__name__} building it without weights") from e
    if model.can_generate() and os.path.exists(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model


def _set(module: nn.Module, name: str, value: torch.Tensor, key: str) -> None:
    old: Any = module._parameters[name] if name in module._parameters else module._buffers[name]
    if tuple(value.shape) != tuple(old.shape):
        raise LoraError(f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(old.shape)} in the model "
                        "its config.json describes; the folder's weights and config do not belong together")
    if value.is_floating_point() and old.is_floating_point():
        value = value.to(old.dtype)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def load_quantized(path: str, dtype: torch.dtype, q: Quantization, device: Any, gguf_file: str | None = None) -> Any:
    """The causal LM in `path` with quantize_model's layers quantized as they are read. NotReadable where the
    checkpoint's tensor names are not the model's own (transformers renames those on load: an old or converted
    checkpoint) or the model cannot be built without its weights; then load it whole and use quantize_model."""
    files = safetensors_files(path)
    where = _keys(files)
    model = _skeleton(path, dtype)
    targets = set(quantizable_names(model, q))
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}  # transformers 5: tied name -> its source
    tied = {key for key, source in tied_keys.items() if key not in where and source in where}
    if set(where) != set(model.state_dict()) - tied:  # tied: a head that is the embedding, tie_weights sets it
        raise NotReadable("its tensor names are not the model's own (transformers renames them on load)")
    layers = sorted(name for name in targets if model.get_submodule(name) is not output_head(model))  # head: int8
    kept = gguf_linears(gguf_file, model, layers) if gguf_file and q.method == "w4a16" else {}
    for module_name, layer in kept.items():
        model.set_submodule(module_name, layer.to(device))
        targets.remove(module_name)
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                module_name, _, name = key.rpartition(".")
                if module_name in kept:
                    continue
                module = model.get_submodule(module_name)
                _set(module, name, f.get_tensor(key), key)
                if module_name in targets and all(p.device.type != "meta" for p in module.parameters(recurse=False)):
                    model.set_submodule(module_name, quantize_linear(module, q, device, module is output_head(model)))
                    targets.remove(module_name)
                    release_freed()
    model.tie_weights()
    for name in sorted(targets):  # a quantized head tied to the embedding: its weight came with the embedding
        module = model.get_submodule(name)
        model.set_submodule(name, quantize_linear(module, q, device, module is output_head(model)))
    mark_quantized(model, q)
    return model

