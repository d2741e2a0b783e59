"""Adapter checkpoints in PEFT's on-disk format, written atomically and read without unpickling code.

A checkpoint directory holds
    adapter_model.safetensors   LoRA weights under PEFT's key names
    adapter_config.json         PEFT's LoraConfig fields (PEFT, vLLM, TGI and LoRAX read these two)
    lora_task.json              this project's task metadata: prompt format, base-model fingerprint, training args
    training_state.pt           optional resume state (optimizer, scheduler, RNG, step), tensors only
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from .errors import LoraError
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

@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    A run killed at any moment leaves either the old complete directory or the new complete one
    (plus, at worst, a hidden `.name.tmp-*` folder), never a half-written checkpoint under `path`.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
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
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(old, name))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    with atomic_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
        write_json(os.path.join(tmp, TASK_FILE), meta)
        if training_state is not None:
            torch.save(training_state, os.path.join(tmp, TRAINING_STATE))
    return path


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoraError(f"{what} {path} is missing; is this a LoRA checkpoint directory (adapter_config.json + "
                        f"adapter_model.safetensors)?") from None
    except (OSError, ValueError) as e:
        raise LoraError(f"{what} {path} is not valid JSON ({e}); re-save the checkpoint") from None


def read_adapter(path, device="cpu"):
    """Read and validate a checkpoint directory (ours or PEFT's) without touching any model."""
    if not os.path.isdir(path):
        raise LoraError(f"checkpoint directory {path} does not exist; point to a folder holding adapter_config.json")
    config = _read_json(os.path.join(path, ADAPTER_CONFIG), "adapter config")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path} holds a {config.get('peft_type') if isinstance(config, dict) else '?'} adapter; "
                        "only LoRA adapters (peft_type LORA) are supported")
    for key, bad, why in (("use_dora", True, "DoRA"), ("bias", "all", "trained biases"),
                          ("bias", "lora_only", "trained biases")):
        if config.get(key, None) == bad:
            raise LoraError(f"{path} uses {why} ({key}={bad!r}), which this project does not apply; "
                            "re-train it as plain LoRA")
    if config.get("modules_to_save"):
        raise LoraError(f"{path} also saves full modules {config['modules_to_save']} (modules_to_save); "
                        "only LoRA weights can be swapped, re-train without modules_to_save")
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(weights_path):
        pickled = os.path.exists(os.path.join(path, "adapter_model.bin"))
        raise LoraError(f"{weights_path} is missing" + (
            "; this checkpoint is a pickle (adapter_model.bin), which is never loaded here: re-save it with "
            "PEFT's save_pretrained(safe_serialization=True)" if pickled else ""))
    try:
        tensors = load_file(weights_path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LoraError(f"{weights_path} is corrupt or truncated ({e}); re-save or re-train this adapter") from None
    parts = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            raise LoraError(f"{weights_path} has an unexpected tensor {key!r}; only LoRA A/B weights are supported")
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
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{weights_path}: adapter for {name} has inconsistent shapes A{list(A.shape)} B{list(B.shape)}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise LoraError(f"{weights_path}: adapter for {name} contains NaN or Inf values; "
                            "the training run diverged, use an earlier checkpoint or a lower learning rate")
        r = A.shape[0]
        alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        modules[name] = ModuleAdapter(A, B, lora_scaling(r, alpha, config.get("use_rslora", False)), p["embedding"])
    task_path = os.path.join(path, TASK_FILE)
    task = _read_json(task_path, "task metadata") if os.path.exists(task_path) else {}
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
    if not os.path.exists(state_path):
        return None
    try:
        return torch.load(state_path, map_location=device, weights_only=True)
    except Exception as e:
        raise LoraError(f"{state_path} cannot be read ({e}); resume from another checkpoint") from None


def adapter_size_bytes(path):
    return os.path.getsize(os.path.join(path, ADAPTER_WEIGHTS))
