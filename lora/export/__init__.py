"""Exporting a task adapter to where models are deployed: llama.cpp and Ollama (GGUF), or a merged transformers folder.

    lora.export_gguf_adapter("smollm2-135m", "runs/qa/final", "qa.gguf")      # llama.cpp --lora qa.gguf
    lora.export_gguf_merged("runs/qa/final", "qa-merged.gguf")                # one GGUF with the task folded in
    lora.export_merged("smollm2-135m", "runs/qa/final", "qa-merged/")         # transformers / vLLM folder
    lora.export_ollama("smollm2-135m", "runs/qa/final", "qa-ollama/")         # ollama create qa -f qa-ollama/Modelfile
"""
import os
from typing import cast

from torch import nn
from transformers import PreTrainedModel

from ..checkpoint import Adapter, check_compatible, read_adapter
from ..errors import LoraError
from ..gguf_adapter import read_gguf_adapter, write_gguf_adapter
from ..gguf_layout import layout_of
from ..models import DEFAULT_MODEL, load_model, smollm2_gguf
from .gguf_merged import write_gguf_merged
from .merged import write_merged
from .ollama import write_ollama

FORMATS = ("gguf-adapter", "gguf-merged", "merged", "ollama")
Model = str | os.PathLike | nn.Module


def load_any_adapter(adapter: Adapter | str | os.PathLike, config: object | None = None) -> Adapter:
    """An Adapter as given, or read from a checkpoint folder or a llama.cpp .gguf adapter file."""
    if isinstance(adapter, Adapter):
        return adapter
    path = os.fspath(adapter)
    return read_gguf_adapter(path, config) if path.endswith(".gguf") else read_adapter(path)


def _model(model: Model, tokenizer: object | None = None) -> tuple[PreTrainedModel, object | None]:
    """(model, tokenizer): a loaded transformers model as given, or loaded in float32 on CPU by name or path."""
    if isinstance(model, nn.Module):
        return cast(PreTrainedModel, model), tokenizer
    return load_model(os.fspath(model), dtype="float32", device="cpu")


def base_gguf_of(model: Model, base_gguf: str | os.PathLike | None = None) -> str | None:
    """The base model's GGUF file: the one given, the default model's packaged file, or None."""
    if base_gguf is not None:
        return os.fspath(base_gguf)
    name = model if not isinstance(model, nn.Module) else getattr(model.config, "_name_or_path", None)
    return smollm2_gguf() if name == DEFAULT_MODEL else None


def export_gguf_adapter(model: Model, adapter: Adapter | str | os.PathLike, out: str | os.PathLike,
                        outtype: str = "f32") -> str:
    """Write the task adapter as a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf --lora OUT`); returns OUT."""
    model, _ = _model(model)
    adapter = load_any_adapter(adapter, model.config)
    check_compatible(adapter, model)
    return write_gguf_adapter(adapter, layout_of(model.config), os.fspath(out), outtype)


def export_gguf_merged(adapter: Adapter | str | os.PathLike, out: str | os.PathLike,
                       base_gguf: str | os.PathLike | None = None, model: Model = DEFAULT_MODEL,
                       outtype: str = "f16") -> str:
    """Write the base model's GGUF with the task folded in (untouched tensors keep their bytes); returns OUT."""
    base = base_gguf_of(model, base_gguf)
    if base is None:
        raise LoraError(f"gguf-merged needs the base model as a GGUF file (--base-gguf), and {model} is a Hugging Face "
                        "folder: export --format merged, then run llama.cpp's convert_hf_to_gguf.py on that folder")
    return write_gguf_merged(load_any_adapter(adapter), base, os.fspath(out), outtype)


def export_merged(model: Model, adapter: Adapter | str | os.PathLike, out: str | os.PathLike,
                  tokenizer: object | None = None) -> str:
    """Write a transformers folder with the task folded in exactly (a loaded `model` is changed); returns OUT."""
    model, tokenizer = _model(model, tokenizer)
    return write_merged(model, tokenizer, load_any_adapter(adapter, model.config), os.fspath(out))


def export_ollama(model: Model, adapter: Adapter | str | os.PathLike, out: str | os.PathLike,
                  base_gguf: str | os.PathLike | None = None, tokenizer: object | None = None,
                  outtype: str = "f32") -> str:
    """Write an Ollama folder (adapter.gguf + Modelfile) for the task; `ollama create NAME -f OUT/Modelfile`."""
    base = base_gguf_of(model, base_gguf)
    model, tokenizer = _model(model, tokenizer)
    if tokenizer is None:
        raise LoraError("pass the base model's tokenizer: the Modelfile's TEMPLATE is rendered with it")
    adapter = load_any_adapter(adapter, model.config)
    check_compatible(adapter, model)
    base = base or getattr(model.config, "_name_or_path", None)
    if not base or not os.path.exists(base):
        raise LoraError("the Modelfile needs the base model as a file or folder Ollama can read; pass --base-gguf")
    return write_ollama(adapter, layout_of(model.config), tokenizer, base, os.fspath(out), outtype)


def export(model: Model, adapter: Adapter | str | os.PathLike, format: str, out: str | os.PathLike,
           outtype: str | None = None, base_gguf: str | os.PathLike | None = None) -> str:
    """One of the four exports by name (what `lora export --format` runs); returns what was written."""
    types = {"outtype": outtype} if outtype else {}
    if format == "gguf-adapter":
        return export_gguf_adapter(model, adapter, out, **types)
    if format == "gguf-merged":
        return export_gguf_merged(adapter, out, base_gguf, model, **types)
    if format == "merged":
        if outtype:
            raise LoraError("--outtype applies to GGUF files; the merged folder keeps the model's dtype")
        return export_merged(model, adapter, out)
    if format == "ollama":
        return export_ollama(model, adapter, out, base_gguf, **types)
    raise LoraError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "base_gguf_of", "export", "export_gguf_adapter", "export_gguf_merged", "export_merged",
           "export_ollama", "load_any_adapter", "read_gguf_adapter"]
