"""Adapter checkpoints in PEFT's on-disk format, written atomically and read without unpickling code.

A checkpoint directory holds
    adapter_model.safetensors   LoRA weights under PEFT's key names
    adapter_config.json         PEFT's LoraConfig fields (PEFT, vLLM, TGI and LoRAX read these two)
    lora_task.json              this project's task metadata: prompt format, base-model fingerprint, training args
    training_state.pt           optional resume state (optimizer, scheduler, RNG, step), tensors only
"""
import contextlib
import ctypes
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file  # bytes in, tensors out: no pickle
from transformers.pytorch_utils import Conv1D

from .data import check_prompt_format
from .errors import LoraError
from .files import MAX_JSON_BYTES, MissingFileError, read_bytes, read_text
from .inject import inject, lora_layers, pattern_value
from .layers import LoraLayer, in_out_features, lora_scaling

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_FILE = "lora_task.json"
TRAINING_STATE = "training_state.pt"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


@dataclass
class ModuleAdapter:
    """One module's adapter: A is (r, in), B is (out, r), whatever the base weight's layout."""
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False

    @property
    def nbytes(self):
        return self.A.nbytes + self.B.nbytes


@dataclass
class Adapter:
    path: str
    modules: dict  # module name -> ModuleAdapter, in file order
    config: dict  # adapter_config.json
    task: dict = field(default_factory=dict)  # lora_task.json, {} for adapters written by PEFT

    @property
    def nbytes(self):
        return sum(m.nbytes for m in self.modules.values())

    @property
    def prompt_format(self):
        return self.task.get("prompt_format")

    @property
    def base_model(self):
        return self.task.get("base_model_name_or_path") or self.config.get("base_model_name_or_path") or "unknown"


# ---------------------------------------------------------------- atomic writes

# A hidden copy atomic_directory leaves if killed: .name.tmp-PID-XXXXXXXX (older versions wrote no PID).
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}")
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _load_renameat2() if sys.platform.startswith("linux") else None


def exchange(a, b):
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the renames are still atomic there
        pass
    finally:
        os.close(fd)


def _running(pid):
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        pass
    return True


def clean_leftovers(parent):
    """Remove the hidden copies that saves killed midway left in `parent` (only those of dead processes).

    A checkpoint moved aside by the no-exchange fallback of `_replace` (`.name.old-*`) goes back under its
    name if that name is empty; every other leftover is deleted.
    """
    for entry in os.scandir(parent):
        m = LEFTOVER.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or (m["pid"] and _running(int(m["pid"]))):
            continue
        target = os.path.join(parent, m["name"])
        # Older versions moved the checkpoint into a folder: .name.old-XXXX/name.
        old_copy = entry.path if m["pid"] else os.path.join(entry.path, m["name"])
        if m["kind"] == "old" and not os.path.lexists(target) and os.path.isdir(old_copy):
            with contextlib.suppress(OSError):  # a leftover that cannot be moved must not stop this save
                os.rename(old_copy, target)
        _remove(entry.path)


def _replace(tmp, path):
    """Put the folder `tmp` under `path`; returns where the previous `path` went (to delete), or None."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return None
    try:
        exchange(tmp, path)  # the name goes from the old complete copy to the new one in one step
        return tmp
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
    # No atomic exchange on this system or filesystem: two renames, with the name empty for the instant between
    # them. A run killed right there leaves the old copy as .name.old-*, which the next save puts back.
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one atomic exchange.

    Whenever a run is killed, `path` holds one complete directory, the old or the new one (on Linux; where the
    OS has no atomic exchange, see `_replace`). Hidden `.name.tmp-*` leftovers of killed runs are removed by
    the next save into the same folder.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkdtemp makes the folder private (0700); a checkpoint is shared like any saved model.
        os.chmod(tmp, 0o777 & ~umask)
        for entry in os.scandir(tmp):
            os.chmod(entry.path, 0o666 & ~umask)
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = _replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------- fingerprint of the base model

def base_weight(model, name):
    module = model.get_submodule(name)
    return (module.base_layer if isinstance(module, LoraLayer) else module).weight


def _sample(weight, n=4096):
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // n)][:n].float().cpu()


def fingerprint(model, names, weight_of=None):
    """Shapes of the targeted weights plus a hash and summary statistics of a fixed sample of each.

    The hash is over bfloat16-rounded values, so a model loaded in float32 or bfloat16 hashes the
    same; the statistics let a float16 copy of the same model match within tolerance.
    """
    weight_of = weight_of or (lambda name: base_weight(model, name))
    digest, shapes, stats = hashlib.sha256(), {}, {}
    for name in names:
        weight = weight_of(name)
        shapes[name] = list(weight.shape)
        if weight.device.type == "meta":
            continue
        sample = _sample(weight)
        digest.update(name.encode() + sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        stats[name] = [float(sample.double().sum()), float(sample.double().abs().sum())]
    return {"shapes": shapes, "sha256": digest.hexdigest() if stats else None, "stats": stats}


def fingerprint_mismatch(expected, model, weight_of=None):
    """None when `model` is the base `expected` was taken from, else a short reason."""
    names = list(expected["shapes"])
    try:
        actual = fingerprint(model, names, weight_of)
    except AttributeError as e:
        return f"the base model has no module {str(e).split()[-1]}"
    for name in names:
        if actual["shapes"][name] != expected["shapes"][name]:
            return f"{name} has shape {actual['shapes'][name]}, the adapter expects {expected['shapes'][name]}"
    if expected.get("sha256") in (None, actual["sha256"]) or not actual["stats"]:
        return None
    for name, (total, abs_total) in expected["stats"].items():
        got_total, got_abs = actual["stats"][name]
        if abs(got_abs - abs_total) > 1e-2 * abs_total + 1e-6 or abs(got_total - total) > 1e-2 * abs_total + 1e-6:
            return f"the weights of {name} differ from those the adapter was trained on"
    return None


# ---------------------------------------------------------------- PEFT key names

def peft_key(module_name, part, embedding):
    return f"{PEFT_PREFIX}{module_name}.lora_embedding_{part}" if embedding else f"{PEFT_PREFIX}{module_name}.lora_{part}.weight"


def parse_peft_key(key):
    """'base_model.model.x.lora_A.weight' -> ('x', 'A', False); None for keys that are not LoRA weights."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix, part, embedding in ((".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
                                    (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True)):
        if name.endswith(suffix):
            return name[: -len(suffix)], part, embedding
    return None


def _short_target_names(model, names):
    """PEFT-style suffixes ('q_proj') when they select exactly `names`; vLLM and TGI expect these."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in short]
    return short if selected == list(names) else list(names)


# ---------------------------------------------------------------- save / read / load

def save_adapter(model, path, base_model_name_or_path=None, task=None, training_state=None):
    """Write the model's LoRA layers as a PEFT checkpoint directory, atomically."""
    layers = lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to save; call lora.inject(model, target_modules) first")
    names = list(layers)
    r = Counter(l.r for l in layers.values()).most_common(1)[0][0]
    alpha = Counter(l.lora_alpha for l in layers.values()).most_common(1)[0][0]
    dropout = next((m.p for l in layers.values() for m in [l.lora_dropout] if hasattr(m, "p")), 0.0)
    base_name = base_model_name_or_path or getattr(model.config, "_name_or_path", None) or "unknown"
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _short_target_names(model, names),
        "rank_pattern": {n: l.r for n, l in layers.items() if l.r != r},
        "alpha_pattern": {n: l.lora_alpha for n, l in layers.items() if l.lora_alpha != alpha},
        "use_rslora": any(l.use_rslora for l in layers.values()),
        "fan_in_fan_out": any(isinstance(l.base_layer, Conv1D) for l in layers.values()),
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "revision": None,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[peft_key(name, "A", layer.embedding)] = layer.lora_A.detach().cpu().contiguous()
        tensors[peft_key(name, "B", layer.embedding)] = layer.lora_B.detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "base_model_name_or_path": base_name,
            "base_fingerprint": fingerprint(model, names), **(task or {})}
    try:
        with atomic_directory(path) as tmp:
            save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
            write_json(os.path.join(tmp, TASK_FILE), meta)
            if training_state is not None:
                torch.save(training_state, os.path.join(tmp, TRAINING_STATE))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise _write_error(e, path) from None
    return path


# How a full disk shows: OSError ENOSPC from Python, "os error 28" from safetensors, and from torch.save only
# "[enforce fail at inline_container.cc:...] unexpected pos" or "... file write failed".
DISK_FULL = ("No space left on device", "os error 28", "inline_container", "file write failed")


def _write_error(e, path):
    """A LoraError naming the checkpoint for a failed write; any other error is returned unchanged."""
    if getattr(e, "errno", None) == errno.ENOSPC or any(s in str(e) for s in DISK_FULL):
        return LoraError(f"disk full while writing {path}; free space or pass another --checkpoint_dir")
    if getattr(e, "errno", None) == errno.EDQUOT or "os error 122" in str(e):
        return LoraError(f"disk quota exceeded while writing {path}; free space or pass another --checkpoint_dir")
    if isinstance(e, OSError):
        return LoraError(f"cannot write checkpoint {path}: {e.strerror or e}; pass another --checkpoint_dir")
    return e


# ---------------------------------------------------------------- validation of what is read

MAX_WEIGHTS_BYTES = 4 << 30  # a rank-64 adapter on every linear layer of a 70B model in float32 is ~3.5 GB
MAX_STATE_BYTES = 3 * MAX_WEIGHTS_BYTES  # weights plus AdamW's two moments
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BIAS_VALUES = ("none", "all", "lora_only")
UNSUPPORTED = {"use_dora": "DoRA", "bias": "trained biases", "lora_bias": "a bias on lora_B",
               "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA",
               "target_parameters": "LoRA on raw parameters", "trainable_token_indices": "trainable tokens",
               "layer_replication": "layer replication"}  # PEFT features whose weights mean more than B @ A
DATA_FORMATS = ("alpaca", "messages", "sharegpt")
TASK_FIELDS = {"prompt_format": (str, "a string"), "base_model_name_or_path": (str, "a string"),
               "system_prompt": (str, "a string"), "chat_template": (bool, "true or false"),
               "training_args": (dict, "an object"), "base_fingerprint": (dict, "an object")}


def _is_number(value):
    """A finite JSON number; true and false are not numbers here, though Python counts them as ints."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_json(path, what, root):
    text = read_text(path, what=what, max_bytes=MAX_JSON_BYTES, root=root)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = e if isinstance(e, ValueError) else "nested too deeply"
        raise LoraError(f"{what} {path} is not valid JSON ({reason}); re-save the checkpoint") from None


def _check_pattern(patterns, file, field, valid, expected):
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise LoraError(f"{file}: {field} must be an object {{module name or regex: {expected}}}, "
                        f"not {type(patterns).__name__}")
    for key, value in patterns.items():
        if not valid(value):
            raise LoraError(f"{file}: {field}[{key!r}] must be {expected}, got {value!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise LoraError(f"{file}: {field} key {key!r} is not a valid regex ({e})") from None


def check_config(config, file):
    """Raise a LoraError naming `file` and the field unless adapter_config.json describes a plain LoRA adapter."""
    if not isinstance(config, dict):
        raise LoraError(f"{file} must be a JSON object of LoRA settings, not {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{file} describes a {config['peft_type']!r} adapter; only LoRA adapters (peft_type LORA) "
                        "are supported")
    if not _is_count(config.get("r", 8)):
        raise LoraError(f"{file}: r must be a positive integer, got {config['r']!r}")
    if not _is_number(config.get("lora_alpha", 8)):
        raise LoraError(f"{file}: lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout <= 1):
        raise LoraError(f"{file}: lora_dropout must be a number from 0 to 1, got {dropout!r}")
    for key in ("use_rslora", "use_dora", "lora_bias", "use_qalora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):  # "false" would count as true
            raise LoraError(f"{file}: {key} must be true or false, got {config[key]!r}")
    _check_pattern(config.get("rank_pattern"), file, "rank_pattern", _is_count, "a positive integer rank")
    _check_pattern(config.get("alpha_pattern"), file, "alpha_pattern", _is_number, "a finite number")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise LoraError(f"{file}: target_modules must be a list of module names or a regex string, got {targets!r}")
    if config.get("base_model_name_or_path") is not None and not isinstance(config["base_model_name_or_path"], str):
        raise LoraError(f"{file}: base_model_name_or_path must be a string, got {config['base_model_name_or_path']!r}")
    bias = config.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise LoraError(f"{file}: bias must be one of {', '.join(BIAS_VALUES)}, got {bias!r}")
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False, "none", [], {}):
            raise LoraError(f"{file} uses {why} ({key}={config[key]!r}), which this project does not apply; "
                            "re-train it as plain LoRA")
    extra = config.get("modules_to_save")
    if extra is not None and not isinstance(extra, list):
        raise LoraError(f"{file}: modules_to_save must be a list or null, got {extra!r}")
    if extra:
        raise LoraError(f"{file} also saves full modules {extra} (modules_to_save); only LoRA weights can be "
                        "swapped, re-train without modules_to_save")


def check_task(task, file):
    """Raise a LoraError naming `file` and the field unless lora_task.json is well-formed."""
    if not isinstance(task, dict):
        raise LoraError(f"{file} must be a JSON object of task metadata, not {type(task).__name__}")
    version = task.get("format_version", FORMAT_VERSION)
    if not _is_count(version):
        raise LoraError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise LoraError(f"{file} has format_version {version}, newer than this lora-pytorch reads "
                        f"({FORMAT_VERSION}); upgrade lora-pytorch")
    for key, (kind, expected) in TASK_FIELDS.items():
        if task.get(key) is not None and not isinstance(task[key], kind):
            raise LoraError(f"{file}: {key} must be {expected} or null, got {task[key]!r}")
    if task.get("prompt_format") is not None:
        check_prompt_format(task["prompt_format"], f"{file}: prompt_format")
    if task.get("data_format") not in (None, *DATA_FORMATS):
        raise LoraError(f"{file}: data_format must be one of {', '.join(DATA_FORMATS)}, got {task['data_format']!r}")
    fp = task.get("base_fingerprint")
    if fp is None:
        return
    shapes, stats = fp.get("shapes"), fp.get("stats", {})
    if not (isinstance(shapes, dict) and all(isinstance(v, list) and all(_is_count(n) for n in v)
                                             for v in shapes.values())):
        raise LoraError(f"{file}: base_fingerprint.shapes must map module names to weight shapes; re-save the adapter")
    if not (isinstance(stats, dict) and all(k in shapes and isinstance(v, list) and len(v) == 2 and
                                            all(map(_is_number, v)) for k, v in stats.items())):
        raise LoraError(f"{file}: base_fingerprint.stats must map module names to two finite numbers; re-save the adapter")
    if fp.get("sha256") is not None and not isinstance(fp["sha256"], str):
        raise LoraError(f"{file}: base_fingerprint.sha256 must be a string or null, got {fp['sha256']!r}")


def _module_adapters(tensors, config, weights_path, config_path):
    """{module name: ModuleAdapter} from a safetensors file's tensors, each checked against the config."""
    parts = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            raise LoraError(f"{weights_path} has an unexpected tensor {key!r}; only LoRA A/B weights are supported")
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoraError(f"{weights_path}: {key} is {str(tensor.dtype).replace('torch.', '')}; LoRA weights must "
                            "be float16, bfloat16, float32 or float64 (quantized adapters are not supported)")
        name, part, embedding = parsed
        parts.setdefault(name, {})[part] = tensor
        parts[name]["embedding"] = embedding
    if not parts:
        raise LoraError(f"{weights_path} holds no LoRA weights")
    modules = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            raise LoraError(f"{weights_path} has only half of the adapter for {name} (A and B are both needed)")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or 0 in A.shape or 0 in B.shape:
            raise LoraError(f"{weights_path}: adapter for {name} has inconsistent shapes A{list(A.shape)} B{list(B.shape)}")
        r = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
        if A.shape[0] != r:
            raise LoraError(f"{weights_path}: adapter for {name} has rank {A.shape[0]}, but {config_path} gives it "
                            f"r={r} (r / rank_pattern); the two files do not belong together")
        a_max, b_max = float(A.abs().max()), float(B.abs().max())  # NaN or Inf if any entry is
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            raise LoraError(f"{weights_path}: adapter for {name} contains NaN or Inf values; "
                            "the training run diverged, use an earlier checkpoint or a lower learning rate")
        alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scaling = lora_scaling(r, alpha, config.get("use_rslora", False))
        # |scaling * B @ A| is at most this; past float32's range the update is Inf, so the alpha is nonsense.
        if abs(scaling) * r * a_max * b_max > torch.finfo(torch.float32).max:
            raise LoraError(f"{config_path}: lora_alpha {alpha!r} for {name} makes the update overflow float32; "
                            "the adapter is corrupt")
        modules[name] = ModuleAdapter(A, B, scaling, p["embedding"])
    return modules


# ---------------------------------------------------------------- read

def read_adapter(path, device="cpu", root=None):
    """Read and validate a checkpoint directory (ours or PEFT's) without touching any model.

    Args:
        path: the checkpoint directory.
        device: where the weights go.
        root: when given, every file is opened inside this folder without following symbolic links
            (OutsideRootError otherwise): use it for paths that come from clients.
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):  # a llama.cpp LoRA adapter file (lora/export/gguf_adapter.py reads that format)
        from .export.gguf_adapter import read_gguf_adapter
        return read_gguf_adapter(path, root=root)
    if root is None and not os.path.isdir(path):
        raise LoraError(f"checkpoint directory {path} does not exist; point to a folder holding adapter_config.json")
    config_path = os.path.join(path, ADAPTER_CONFIG)
    try:
        config = _read_json(config_path, "adapter config", root)
    except MissingFileError:
        raise LoraError(f"{config_path} is missing; is {path} a LoRA checkpoint directory (adapter_config.json + "
                        "adapter_model.safetensors)?") from None
    check_config(config, config_path)
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
        task = _read_json(task_path, "task metadata", root)
    except MissingFileError:
        task = {}  # adapters written by PEFT have none
    check_task(task, task_path)
    return Adapter(path=path, modules=modules, config=config, task=task)


def check_compatible(adapter, model, weight_of=None):
    """Raise a LoraError naming both models unless `adapter` was trained on (a copy of) `model`'s base.

    `weight_of(name)` gives a module's untouched base weight when the model's own may hold a merged task.
    """
    ours = getattr(model.config, "_name_or_path", None) or type(model).__name__

    def fail(reason):
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
    reason = expected and fingerprint_mismatch(expected, model, weight_of)
    if reason:
        fail(reason)


def load_adapter(model, path, device=None, dropout=0.0):
    """Inject LoRA layers as the checkpoint describes and load its weights. Returns the Adapter read."""
    adapter = read_adapter(path)
    check_compatible(adapter, model)
    names = list(adapter.modules)
    ranks = {n: m.A.shape[0] for n, m in adapter.modules.items()}
    cfg = adapter.config
    inject(model, names, r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=dropout,
           rslora=cfg.get("use_rslora", False), rank_pattern={n.replace(".", r"\."): r for n, r in ranks.items()},
           alpha_pattern={k: v for k, v in (cfg.get("alpha_pattern") or {}).items()})
    with torch.no_grad():
        for name, m in adapter.modules.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(m.A)
            layer.lora_B.copy_(m.B)
            layer.scaling = m.scaling
    if device is not None:
        model.to(device)
    return adapter


def load_training_state(path, device="cpu"):
    """Resume state saved beside an adapter, or None. Tensors and plain containers only: no code runs."""
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
    return state


def adapter_size_bytes(path):
    return os.path.getsize(os.path.join(path, ADAPTER_WEIGHTS))
