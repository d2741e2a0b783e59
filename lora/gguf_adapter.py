"""llama.cpp's LoRA adapter GGUF: write an Adapter in that format, and read one back as an Adapter.

The format (llama.cpp's convert_lora_to_gguf.py writes it, src/llama-adapter.cpp loads it): metadata
general.type = "adapter", adapter.type = "lora", adapter.lora.alpha; per adapted weight two tensors named
after the base tensor, `blk.N.attn_q.weight.lora_a` (A, r x in) and `.lora_b` (B, out x r), token_embd's A
stored transposed. llama.cpp scales every tensor by alpha / r, so this writer folds each module's own scaling
(rsLoRA, rank_pattern, alpha_pattern) into B; Llama q/k rows of B take the converter's rotary reordering.
"""
import contextlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from .checkpoint import MAX_WEIGHTS_BYTES, Adapter, ModuleAdapter, check_task
from .errors import LoraError
from .files import read_bytes
from .gguf_layout import BY_GGUF_NAME, Layout, rope_reorder, rope_restore

OUTTYPES = {"f32": np.float32, "f16": np.float16}
TASK_KEY = "lora_pytorch.task"  # the adapter's lora_task.json, so prompts render as training did when read back
HEADS_KEY = "{arch}.attention.head_count"  # written too: a reader can undo the q/k reordering without the base


def refuse_unloadable(adapter: Adapter, layout: Layout, where: str) -> None:
    """A LoraError for what llama.cpp (and an exact merge) cannot take: DoRA, trained biases, a tied head's adapter."""
    config = adapter.config
    if config.get("use_dora"):
        raise LoraError(f"{adapter.path} is a DoRA adapter; {where} cannot express its magnitude vector, "
                        "re-train it as plain LoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise LoraError(f"{adapter.path} trains biases (bias={config.get('bias')!r}); {where} carries only the A/B "
                        "matrices, re-train with bias='none'")
    for name, m in adapter.modules.items():
        if layout.tied_head and (name == layout.family.head or m.embedding):
            raise LoraError(f"{adapter.path} adapts {name}, whose weight is tied to the "
                            f"{'output head' if m.embedding else 'input embeddings'} in this base model; "
                            f"{where} would change both, re-train without {name}")


def gguf_factors(name: str, m: ModuleAdapter, layout: Layout, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) of one module as llama.cpp wants them, with `scaling` folded into B for `alpha`."""
    r = m.A.shape[0]
    A, B = m.A.float(), m.B.double() * (m.scaling * r / alpha)
    heads = layout.rope_heads(name)
    if heads is not None:
        B = rope_reorder(B, heads)
    return (A.T if m.embedding else A).contiguous(), B.float().contiguous()


def write_gguf_adapter(adapter: Adapter, layout: Layout, out: str, outtype: str = "f32") -> str:
    """Write `adapter` as a llama.cpp LoRA GGUF file at `out` (replaced atomically); returns `out`."""
    if outtype not in OUTTYPES:
        raise LoraError(f"a GGUF adapter is written as {' or '.join(OUTTYPES)}, not {outtype!r} (B is r columns wide, "
                        "too narrow for Q8_0 blocks); pass --outtype f32 or f16")
    refuse_unloadable(adapter, layout, "a llama.cpp adapter")
    configured = adapter.config.get("lora_alpha", 8)
    alpha = float(configured) if configured else 1.0  # 0 would tell llama.cpp not to scale at all
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        key = layout.tensor_name(name)
        tensors[key + ".lora_a"], tensors[key + ".lora_b"] = gguf_factors(name, m, layout, alpha)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.family.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(os.path.basename(os.path.normpath(adapter.path)) or "adapter")
        writer.add_head_count(layout.n_head)
        writer.add_head_count_kv(layout.n_head_kv)
        writer.add_string(TASK_KEY, json.dumps(adapter.task))
        for key, tensor in tensors.items():
            writer.add_tensor(key, tensor.numpy().astype(OUTTYPES[outtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


@contextlib.contextmanager
def atomic_file(out: str) -> Iterator[str]:
    """A temporary path beside `out` that replaces `out` on success and is removed on failure."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; an exported model is shared like any other
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise LoraError(f"cannot write {out}: {e.strerror or e}; free space or pass another --out") from None
        raise


# ---------------------------------------------------------------- read

class GGUFReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of the mapped file: np.memmap runs a Python hook on every slice,
    and the reader slices twice per vocabulary string (seconds for a 49k-token tokenizer, a third of that here)."""

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)  # still the mapped bytes: nothing is read until used


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _open(path: str, root: str | None) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """([(tensor name, float32 array in PyTorch's layout)], metadata), the file read once (see lora.files)."""
    data = read_bytes(path, what="GGUF adapter", max_bytes=MAX_WEIGHTS_BYTES, root=root)
    with tempfile.NamedTemporaryFile(suffix=".gguf") as copy:  # the bytes checked are the bytes parsed
        copy.write(data)
        copy.flush()
        del data
        try:
            reader = GGUFReader(copy.name)
            tensors = [(t.name, np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                        .reshape(tuple(int(n) for n in reversed(t.shape)))) for t in reader.tensors]
            meta = {key: _field(reader, key) for key in reader.fields}
        except (ValueError, KeyError, IndexError, NotImplementedError) as e:
            raise LoraError(f"{path} is not a readable GGUF file ({e}); re-export the adapter") from None
    return tensors, meta


def _heads(meta: dict[str, Any], arch: str, config: Any) -> tuple[int, int]:
    n_head = meta.get(HEADS_KEY.format(arch=arch))
    if n_head is not None:
        return int(n_head), int(meta.get(HEADS_KEY.format(arch=arch) + "_kv") or n_head)
    if config is not None:
        n_head = int(config.num_attention_heads)
        return n_head, int(getattr(config, "num_key_value_heads", None) or n_head)
    return 0, 0


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether a task path names a llama.cpp LoRA adapter file rather than a PEFT-format folder."""
    return os.fspath(path).endswith(".gguf")


def read_gguf_adapter(path: str, config: Any = None, root: str | None = None) -> Adapter:
    """A llama.cpp LoRA adapter GGUF as an Adapter on CPU, in this package's (HF) layout.

    Args:
        path: the .gguf file.
        config: the base model's transformers config; needed only for adapters on Llama q/k weights from other
            writers (llama.cpp's converter records no head counts, which undoing the reordering needs).
        root: as for lora.read_adapter: the file must lie inside this folder (a server's --adapter-root).
    """
    path = os.fspath(path)
    tensors, meta = _open(path, root)
    if meta.get("general.type") != "adapter" or meta.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise LoraError(f"{path} is not a LoRA adapter GGUF (general.type={meta.get('general.type')!r}, "
                        f"adapter.type={meta.get(gguf.Keys.Adapter.TYPE)!r}); give llama.cpp's LoRA adapter file")
    arch = str(meta.get("general.architecture"))
    family = BY_GGUF_NAME.get(arch)
    if family is None:
        raise LoraError(f"{path} is an adapter for llama.cpp's {arch!r} models; this package reads adapters for "
                        f"{', '.join(BY_GGUF_NAME)} models")
    alpha = float(meta.get(gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
    blocks = [int(match[1]) for name, _ in tensors if (match := re.match(r"blk\.(\d+)\.", name))]
    n_head, n_head_kv = _heads(meta, arch, config)
    layout = Layout(family, max(blocks, default=-1) + 1, n_head, n_head_kv, tied_head=False)
    modules_by_tensor = layout.module_names()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in tensors:
        tensor, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or tensor not in modules_by_tensor:
            raise LoraError(f"{path} has a tensor {key!r} that is not a LoRA A/B pair of a {arch} weight; "
                            "only plain LoRA adapters are read")
        parts.setdefault(tensor, {})[part] = torch.from_numpy(array)
    if not parts:
        raise LoraError(f"{path} holds no LoRA tensors")
    modules = {}
    for tensor, p in parts.items():
        name = modules_by_tensor[tensor]
        if "lora_a" not in p or "lora_b" not in p:
            raise LoraError(f"{path} has only half of the adapter for {tensor} (lora_a and lora_b are both needed)")
        embedding = tensor == "token_embd.weight"
        A, B = (p["lora_a"].T.contiguous() if embedding else p["lora_a"]), p["lora_b"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{path}: the adapter for {tensor} has inconsistent shapes A{list(A.shape)} "
                            f"B{list(B.shape)}; re-export it")
        if not (math.isfinite(float(A.abs().max())) and math.isfinite(float(B.abs().max()))):
            raise LoraError(f"{path}: the adapter for {tensor} contains NaN or Inf values; re-export it")
        heads = layout.rope_heads(name)
        if heads is not None:
            if heads <= 0 or B.shape[0] % (2 * heads):
                raise LoraError(f"{path} adapts {tensor} but records no usable head counts, which undoing llama.cpp's "
                                "q/k row order needs; load it with the base model's config")
            B = rope_restore(B, heads).contiguous()
        r = A.shape[0]
        modules[name] = ModuleAdapter(A, B, alpha / r if alpha else 1.0, embedding)
    try:
        task = json.loads(meta.get(TASK_KEY) or "{}")
    except ValueError:
        raise LoraError(f"{path}: {TASK_KEY} is not valid JSON; re-export the adapter") from None
    check_task(task, f"{path} ({TASK_KEY})")
    ranks = Counter(m.A.shape[0] for m in modules.values())
    base = task.get("base_model_name_or_path") or meta.get("general.basename") or "unknown"
    config_out = {"peft_type": "LORA", "r": ranks.most_common(1)[0][0], "lora_alpha": alpha,
                  "target_modules": list(modules), "base_model_name_or_path": base}
    return Adapter(path=path, modules=modules, config=config_out, task=task)
