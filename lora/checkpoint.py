"""Adapter checkpoints: save, read and load them (PEFT's format plus this project's task file), and resume state.

A checkpoint directory holds
    adapter_model.safetensors   LoRA weights under PEFT's key names   (peft_format.py)
    adapter_config.json         PEFT's LoraConfig fields               (peft_format.py)
    lora_task.json              this project's task metadata: prompt format, base-model fingerprint, training args
    training_state.pt           optional resume state (optimizer, scheduler, step), tensors and plain containers only
It is written atomically (atomic.py) and read without unpickling code.
"""
import errno
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors  # bytes in, tensors out: no pickle
from safetensors.torch import save_file

from .atomic import atomic_directory
from .data import FORMAT_KEYS, check_prompt_format
from .errors import LoraError
from .files import MAX_JSON_BYTES, MissingFileError, read_bytes, read_text
from .fingerprint import (
    QUANTIZED_TOLERANCE,
    TOLERANCE,
    WeightOf,
    any_quantized,
    check_fingerprint,
    fingerprint,
    fingerprint_mismatch,
)
from .inject import find_targets, lora_layers, wrap
from .layers import LoraLayer, in_out_features
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FLOAT32_MAX,
    adapter_config,
    check_config,
    is_count,
    module_settings,
    parse_peft_key,
    peft_key,
    shown,
)
from .structured import check_response_schema

TASK_FILE = "lora_task.json"
TRAINING_STATE = "training_state.pt"
FORMAT_VERSION = 1
# What a checkpoint folder may hold: ours, and what PEFT's save_pretrained writes. save_adapter replaces only these.
CHECKPOINT_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_FILE, TRAINING_STATE, "adapter_model.bin", "README.md"}
MAX_WEIGHTS_BYTES = 4 << 30  # a rank-64 adapter on every linear layer of a 70B model in float32 is ~3.5 GB
MAX_STATE_BYTES = 3 * MAX_WEIGHTS_BYTES  # weights plus AdamW's two moments
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DATA_FORMATS = tuple(FORMAT_KEYS)
TASK_FIELDS = {"prompt_format": (str, "a string"), "base_model_name_or_path": (str, "a string"),
               "system_prompt": (str, "a string"), "chat_template": (bool, "true or false"),
               "training_args": (dict, "an object"), "base_fingerprint": (dict, "an object"),
               "response_schema": (dict, "a JSON schema object"), "quantization_config": (dict, "an object")}
# How a full disk shows: OSError ENOSPC from Python, "os error 28" from safetensors, and from torch.save only
# "[enforce fail at inline_container.cc:...] unexpected pos" or "... file write failed".
DISK_FULL = ("No space left on device", "os error 28", "inline_container", "file write failed")


@dataclass
class ModuleAdapter:
    """One module's adapter: A is (r, in), B is (out, r), whatever the base weight's layout."""
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes


@dataclass
class Adapter:
    path: str
    modules: dict[str, ModuleAdapter]  # in file order
    config: dict[str, Any]  # adapter_config.json
    task: dict[str, Any] = field(default_factory=dict)  # lora_task.json, {} for adapters written by PEFT

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    @property
    def base_model(self) -> str:
        return self.task.get("base_model_name_or_path") or self.config.get("base_model_name_or_path") or "unknown"


# ---------------------------------------------------------------- save

def write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check_replaceable(path: str) -> None:
    """Refuse, naming `path`, to save over anything but a checkpoint folder, so that no file of the user's is lost."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        kind = "a symbolic link" if os.path.islink(path) else "a file"
        raise LoraError(f"{path} is {kind}, not a checkpoint folder, and saving would replace it; nothing was "
                        "written: save to a new folder path")
    entries = list(os.scandir(path))
    names = sorted(e.name for e in entries)
    others = [e.name for e in entries if e.name not in CHECKPOINT_FILES or not e.is_file(follow_symlinks=False)]
    if others or (names and not {ADAPTER_CONFIG, ADAPTER_WEIGHTS} & set(names)):
        held = ", ".join(sorted(others or names)[:5]) + (", ..." if len(others or names) > 5 else "")
        raise LoraError(f"{path} exists and is not a checkpoint (it holds {held}); saving replaces only a checkpoint "
                        "folder, so nothing was written: save to a new folder path")


def save_adapter(model: nn.Module, path: str | os.PathLike[str], base_model_name_or_path: str | None = None,
                 task: dict[str, Any] | None = None, training_state: dict[str, Any] | None = None) -> str:
    """Write the model's LoRA layers as a PEFT checkpoint directory, atomically; returns its path.

    `path` must be new, empty, or a checkpoint (which is replaced): anything else is a LoraError.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to save; call lora.inject(model, target_modules) first")
    base_name = base_model_name_or_path or getattr(model.config, "_name_or_path", None) or "unknown"
    tensors = {}
    for name, layer in layers.items():
        tensors[peft_key(name, "A", layer.embedding)] = layer.lora_A.detach().cpu().contiguous()
        tensors[peft_key(name, "B", layer.embedding)] = layer.lora_B.detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "base_model_name_or_path": base_name,
            "base_fingerprint": fingerprint(model, list(layers)), **(task or {})}
    try:
        check_replaceable(os.fspath(path))
        with atomic_directory(path) as tmp:
            save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            write_json(os.path.join(tmp, ADAPTER_CONFIG), adapter_config(model, layers, base_name))
            write_json(os.path.join(tmp, TASK_FILE), meta)
            if training_state is not None:
                torch.save(training_state, os.path.join(tmp, TRAINING_STATE))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise _write_error(e, path) from None
    return os.fspath(path)


def _write_error(e: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """A LoraError naming the checkpoint for a failed write; any other error is returned unchanged."""
    if getattr(e, "errno", None) == errno.ENOSPC or any(s in str(e) for s in DISK_FULL):
        return LoraError(f"disk full while writing {path}; free space or pass another --checkpoint_dir")
    if getattr(e, "errno", None) == errno.EDQUOT or "os error 122" in str(e):
        return LoraError(f"disk quota exceeded while writing {path}; free space or pass another --checkpoint_dir")
    if isinstance(e, OSError):
        return LoraError(f"cannot write checkpoint {path}: {e.strerror or e}; pass another --checkpoint_dir")
    return e


# ---------------------------------------------------------------- read

def _read_json(path: str, what: str, root: str | None) -> object:
    text = read_text(path, what=what, max_bytes=MAX_JSON_BYTES, root=root)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = e if isinstance(e, ValueError) else "nested too deeply"
        raise LoraError(f"{what} {path} is not valid JSON ({reason}); re-save the checkpoint") from None


def check_task(task: object, file: str) -> dict[str, Any]:
    """`task` if lora_task.json is well-formed, else a LoraError naming `file` and the field."""
    if not isinstance(task, dict):
        raise LoraError(f"{file} must be a JSON object of task metadata, not {type(task).__name__}")
    version = task.get("format_version", FORMAT_VERSION)
    if not is_count(version):
        raise LoraError(f"{file}: format_version must be a positive integer, got {shown(version)}")
    if version > FORMAT_VERSION:
        raise LoraError(f"{file} has format_version {version}, newer than this lora-pytorch reads "
                        f"({FORMAT_VERSION}); upgrade lora-pytorch")
    for key, (kind, expected) in TASK_FIELDS.items():
        if task.get(key) is not None and not isinstance(task[key], kind):
            raise LoraError(f"{file}: {key} must be {expected} or null, got {shown(task[key])}")
    if task.get("prompt_format") is not None:
        check_prompt_format(task["prompt_format"], f"{file}: prompt_format")
    if task.get("data_format") not in (None, *DATA_FORMATS):
        raise LoraError(f"{file}: data_format must be one of {', '.join(DATA_FORMATS)}, "
                        f"got {shown(task['data_format'])}")
    if task.get("base_fingerprint") is not None:
        check_fingerprint(task["base_fingerprint"], file)
    if task.get("response_schema") is not None:
        check_response_schema(task["response_schema"], f"{file}: response_schema")
    return task


def _module_adapters(tensors: dict[str, torch.Tensor], config: dict[str, Any], weights_path: str,
                     config_path: str) -> dict[str, ModuleAdapter]:
    """{module name: ModuleAdapter} from a safetensors file's tensors, each checked against the config."""
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            raise LoraError(f"{weights_path} has an unexpected tensor {key!r}; only LoRA A/B weights are supported")
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoraError(f"{weights_path}: {key} is {str(tensor.dtype).replace('torch.', '')}; LoRA weights must "
                            "be float16, bfloat16, float32 or float64 (quantized adapters are not supported)")
        parts.setdefault(parsed.module, {})[parsed.part] = tensor
        parts[parsed.module]["embedding"] = parsed.embedding
    if not parts:
        raise LoraError(f"{weights_path} holds no LoRA weights")
    modules = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            raise LoraError(f"{weights_path} has only half of the adapter for {name} (A and B are both needed)")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or 0 in A.shape or 0 in B.shape:
            raise LoraError(f"{weights_path}: adapter for {name} has inconsistent shapes "
                            f"A{list(A.shape)} B{list(B.shape)}")
        settings = module_settings(config, name, config_path)
        if A.shape[0] != settings.r:
            raise LoraError(f"{weights_path}: adapter for {name} has rank {A.shape[0]}, but {config_path} gives it "
                            f"r={settings.r} (r / rank_pattern); the two files do not belong together")
        a_max, b_max = float(A.abs().max()), float(B.abs().max())  # NaN or Inf if any entry is
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            raise LoraError(f"{weights_path}: adapter for {name} contains NaN or Inf values; "
                            "the training run diverged, use an earlier checkpoint or a lower learning rate")
        # |scaling * B @ A| is at most this; past float32's range the update is Inf, so the alpha is nonsense.
        if abs(settings.scaling) * settings.r * a_max * b_max > FLOAT32_MAX:
            raise LoraError(f"{config_path}: lora_alpha {shown(settings.alpha)} for {name} makes the update overflow "
                            "float32; the adapter is corrupt")
        modules[name] = ModuleAdapter(A, B, settings.scaling, p["embedding"])
    return modules


def read_adapter(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 root: str | os.PathLike[str] | None = None) -> Adapter:
    """Read and validate a checkpoint directory (ours or PEFT's) without touching any model.

    Args:
        path: the checkpoint directory.
        device: where the weights go.
        root: when given, every file is opened inside this folder without following symbolic links
            (OutsideRootError otherwise): use it for paths that come from clients.
    """
    path = os.fspath(path)
    root = None if root is None else os.fspath(root)
    if root is None and not os.path.isdir(path):
        raise LoraError(f"checkpoint directory {path} does not exist; point to a folder holding adapter_config.json")
    config_path = os.path.join(path, ADAPTER_CONFIG)
    try:
        config = check_config(_read_json(config_path, "adapter config", root), config_path)
    except MissingFileError:
        raise LoraError(f"{config_path} is missing; is {path} a LoRA checkpoint directory (adapter_config.json + "
                        "adapter_model.safetensors)?") from None
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    try:
        data = read_bytes(weights_path, what="adapter weights", max_bytes=MAX_WEIGHTS_BYTES, root=root)
    except MissingFileError:
        pickled = os.path.lexists(os.path.join(path, "adapter_model.bin"))
        raise LoraError(f"{weights_path} is missing" + (
            "; this checkpoint is a pickle (adapter_model.bin), which is never loaded here: re-save it with "
            "PEFT's save_pretrained(safe_serialization=True)" if pickled else "")) from None
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LoraError(f"{weights_path} is corrupt or truncated ({e}); re-save or re-train this adapter") from None
    del data
    modules = _module_adapters(tensors, config, weights_path, config_path)
    if torch.device(device).type != "cpu":
        for m in modules.values():
            m.A, m.B = m.A.to(device), m.B.to(device)
    task_path = os.path.join(path, TASK_FILE)
    try:
        task = check_task(_read_json(task_path, "task metadata", root), task_path)
    except MissingFileError:
        task = {}  # adapters written by PEFT have none
    return Adapter(path=path, modules=modules, config=config, task=task)


# ---------------------------------------------------------------- load into a model

def check_compatible(adapter: Adapter, model: nn.Module, weight_of: WeightOf | None = None) -> None:
    """Raise a LoraError naming both models unless `adapter` was trained on (a copy of) `model`'s base.

    `weight_of(name)` gives a module's untouched base weight when the model's own may hold a merged task.
    """
    ours = getattr(model.config, "_name_or_path", None) or type(model).__name__

    def fail(reason: str) -> NoReturn:
        raise LoraError(f"checkpoint {adapter.path} was trained on base model {adapter.base_model!r}, not on the "
                        f"loaded {ours!r}: {reason}; load the base model it was trained on")
    modules = dict(model.named_modules())
    for name, m in adapter.modules.items():
        module = modules.get(name)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        if module is None:
            fail(f"the base model has no module {name}")
        try:
            in_f, out_f = in_out_features(module)
        except TypeError:
            fail(f"{name} is a {type(module).__name__}, which LoRA cannot wrap")
        if (m.A.shape[1], m.B.shape[0]) != (in_f, out_f):
            fail(f"{name} maps {in_f} -> {out_f} features, the adapter {m.A.shape[1]} -> {m.B.shape[0]}")
    expected = adapter.task.get("base_fingerprint")
    # Quantized on either side (recorded in the adapter's task, or packed here): compare as de-quantized weights
    lossy = bool(adapter.task.get("quantization_config")) or any_quantized(model, list(adapter.modules))
    reason = expected and fingerprint_mismatch(expected, model, weight_of, QUANTIZED_TOLERANCE if lossy else TOLERANCE)
    if reason:
        fail(reason)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], device: str | torch.device | None = None,
                 dropout: float = 0.0) -> Adapter:
    """Inject LoRA layers as the checkpoint describes and load its weights. Returns the Adapter read."""
    adapter = read_adapter(path)
    check_compatible(adapter, model)
    config_path = os.path.join(adapter.path, ADAPTER_CONFIG)
    names = find_targets(model, list(adapter.modules))
    settings = {n: module_settings(adapter.config, n, config_path) for n in names}
    wrap(model, {n: s.r for n, s in settings.items()}, {n: s.alpha for n, s in settings.items()}, dropout,
         adapter.config.get("use_rslora", False))
    with torch.no_grad():
        for name, m in adapter.modules.items():
            layer = model.get_submodule(name)
            assert isinstance(layer, LoraLayer)
            layer.lora_A.copy_(m.A)
            layer.lora_B.copy_(m.B)
    if device is not None:
        model.to(device)
    return adapter


# ---------------------------------------------------------------- resume state

def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What train.py saves; a field is checked when present, and the first five must be.
STATE_FIELDS = {"optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                              and isinstance(v.get("param_groups"), list), "an optimizer state_dict"),
                "scheduler": (lambda v: isinstance(v, dict), "a scheduler state_dict"),
                "step": (_is_whole, "a whole number (0 or more)"),
                "epoch": (_is_whole, "a whole number (0 or more)"),
                "examples_done": (_is_whole, "a whole number (0 or more)"),
                "bad_evals": (_is_whole, "a whole number (0 or more)"),
                "best_val": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
                             "a number"),
                "settings": (lambda v: isinstance(v, dict), "an object"),
                "scaler": (lambda v: isinstance(v, dict), "a gradient scaler state_dict")}
REQUIRED_STATE = ("optimizer", "scheduler", "step", "epoch", "examples_done", "bad_evals", "best_val", "settings")


def load_training_state(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Resume state saved beside an adapter, or None. Tensors and plain containers only: no code runs.

    Every field train.py relies on is checked: a tampered or foreign file is a LoraError naming it and the field.
    """
    state_path = os.path.join(path, TRAINING_STATE)
    try:
        data = read_bytes(state_path, what="training state", max_bytes=MAX_STATE_BYTES)
    except MissingFileError:
        return None
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:
        raise LoraError(f"{state_path} cannot be read ({e}); resume from another checkpoint") from None
    if not isinstance(state, dict):
        raise LoraError(f"{state_path} holds a {type(state).__name__}, not a training state; resume from another "
                        "checkpoint")
    for key in REQUIRED_STATE:
        if key not in state:
            raise LoraError(f"{state_path} has no {key}, so it is not a training state this version wrote; resume "
                            "from another checkpoint, or load only the adapter by starting a new run")
    for key, (valid, expected) in STATE_FIELDS.items():
        if key in state and not valid(state[key]):
            raise LoraError(f"{state_path}: {key} must be {expected}, got {shown(state[key])}; the file is damaged "
                            "or was edited: resume from another checkpoint")
    return state


def adapter_size_bytes(path: str | os.PathLike[str]) -> int:
    return os.path.getsize(os.path.join(path, ADAPTER_WEIGHTS))
