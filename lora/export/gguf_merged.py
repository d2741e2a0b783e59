"""One GGUF model file with a task folded in, written from a base that is itself a GGUF file.

Everything the base holds is kept: its metadata, tokenizer and chat template, and the bytes of every tensor the
adapter does not touch (quantized or not). Each adapted tensor is dequantized, gets scaling * B @ A in one addmm
(rows in llama.cpp's rotary order for q/k), and is written as F32, F16 or Q8_0.
"""
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch

from ..checkpoint import Adapter, ModuleAdapter, fingerprint_mismatch
from ..errors import LoraError
from ..gguf_adapter import GGUFReader, atomic_file, refuse_unloadable
from ..gguf_layout import BY_GGUF_NAME, Layout, rope_reorder, rope_restore

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_layout(reader: gguf.GGUFReader, path: str) -> Layout:
    """The Layout a GGUF model file describes (architecture, blocks, heads; tied when it has no output tensor)."""
    arch = str(_value(reader, "general.architecture"))
    family = BY_GGUF_NAME.get(arch)
    if family is None or _value(reader, "general.type") not in (None, "model"):
        raise LoraError(f"{path} is not a {' or '.join(BY_GGUF_NAME)} model GGUF (architecture {arch!r}); give the "
                        "base model's GGUF file")
    n_head = int(_value(reader, f"{arch}.attention.head_count") or 0)
    n_head_kv = int(_value(reader, f"{arch}.attention.head_count_kv") or n_head)
    blocks = int(_value(reader, f"{arch}.block_count") or 0)
    names = {t.name for t in reader.tensors}
    return Layout(family, blocks, n_head, n_head_kv, tied_head="output.weight" not in names)


def dequantized(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy's (row-major) shape: (out, in) for a weight."""
    rows = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(rows.reshape(tuple(int(n) for n in reversed(tensor.shape))))


def hf_layout(weight: torch.Tensor, name: str, m: ModuleAdapter, layout: Layout) -> torch.Tensor:
    """A GGUF weight as the HF module holds it (q/k rows restored; GPT-2's Conv1D weights are (in, out))."""
    heads = layout.rope_heads(name)
    weight = rope_restore(weight, heads) if heads is not None else weight
    conv1d = layout.family.name == "gpt2" and not m.embedding and name != layout.family.head
    return weight.T if conv1d else weight


def merged_tensor(weight: torch.Tensor, name: str, m: ModuleAdapter, layout: Layout) -> torch.Tensor:
    """weight + scaling * B @ A in GGUF's layout: rows reordered for q/k, the transpose for token embeddings."""
    A, B = m.A.float(), m.B.float()
    heads = layout.rope_heads(name)
    if heads is not None:
        B = rope_reorder(B, heads)
    first, second = (A.T, B.T) if m.embedding else (B, A)
    return torch.addmm(weight, first, second, alpha=m.scaling)


def encode(weight: torch.Tensor, outtype: str, name: str) -> np.ndarray:
    array = weight.numpy()
    if outtype == "f32":
        return array
    if outtype == "f16":
        return array.astype(np.float16)
    if array.shape[-1] % 32:
        raise LoraError(f"{name} has rows of {array.shape[-1]} values, not a multiple of Q8_0's 32; pass --outtype f16")
    return gguf.quants.quantize(array, OUTTYPES["q8_0"])


def write_gguf_merged(adapter: Adapter, base_gguf: str, out: str, outtype: str = "f16") -> str:
    """Write `base_gguf` with `adapter` folded in as a GGUF model file at `out` (replaced atomically); returns `out`."""
    if outtype not in OUTTYPES:
        raise LoraError(f"merged tensors are written as {', '.join(OUTTYPES)}, not {outtype!r}")
    try:
        reader = GGUFReader(base_gguf)
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot read the base GGUF {base_gguf} ({e}); give the base model's .gguf file") from None
    layout = gguf_layout(reader, base_gguf)
    refuse_unloadable(adapter, layout, "a merged GGUF")
    by_name = {t.name: t for t in reader.tensors}
    changed = {layout.tensor_name(name): (name, m) for name, m in adapter.modules.items()}
    for tensor, (_, m) in changed.items():
        shape = tuple(int(n) for n in reversed(by_name[tensor].shape)) if tensor in by_name else None
        expected = (m.B.shape[0], m.A.shape[1]) if not m.embedding else (m.A.shape[1], m.B.shape[0])
        if shape != expected:
            raise LoraError(f"{adapter.path} does not fit {base_gguf}: {tensor} is {shape or 'missing'} there, the "
                            f"adapter needs {expected}; give the GGUF of the base model it was trained on")
    check_base(adapter, base_gguf, layout, {name: by_name[t] for t, (name, _) in changed.items()})

    def fold(t: gguf.ReaderTensor) -> torch.Tensor | None:
        return merged_tensor(dequantized(t), *changed[t.name], layout) if t.name in changed else None
    return rewrite_gguf(reader, out, fold, outtype)


def rewrite_gguf(reader: gguf.GGUFReader, out: str, new_tensor: Callable[[gguf.ReaderTensor], torch.Tensor | None],
                 outtype: str) -> str:
    """Copy a GGUF model file to `out` (atomically): all metadata, and each tensor's bytes unless `new_tensor`
    gives a new value for it, which is written as `outtype`."""
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, str(_value(reader, gguf.Keys.General.ARCHITECTURE)))
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue  # the writer writes these itself
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        for t in reader.tensors:
            new = new_tensor(t)
            if new is None:  # the base's own bytes
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            else:
                writer.add_tensor(t.name, encode(new, outtype, t.name), raw_dtype=OUTTYPES[outtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def check_base(adapter: Adapter, path: str, layout: Layout, tensors: dict[str, gguf.ReaderTensor]) -> None:
    """A LoraError unless the GGUF's weights are those the adapter was trained on (its recorded fingerprint)."""
    expected = adapter.task.get("base_fingerprint")
    if not expected:
        return

    def weight_of(name: str) -> torch.Tensor:
        return hf_layout(dequantized(tensors[name]), name, adapter.modules[name], layout)
    reason = fingerprint_mismatch(expected, None, weight_of)
    if reason:
        raise LoraError(f"{adapter.path} was trained on another base model than {path}: {reason}; give the GGUF of "
                        f"the base model it was trained on ({adapter.base_model})")
