"""PEFT's adapter format: tensor key names and adapter_config.json's fields, written and checked in one place.

PEFT, vLLM, TGI and LoRAX read these two files: adapter_model.safetensors (LoRA weights under PEFT's key names)
and adapter_config.json (PEFT's LoraConfig fields). Every check of a rank, an alpha or a pattern is here.
"""
import math
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import LoraError
from .patterns import MAX_PATTERNS, check_pattern, pattern_key, pattern_value

if TYPE_CHECKING:  # layers imports check_rank from here
    from .layers import LoraLayer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAX_RANK = 1 << 20  # past any hidden size; bounds what a config can make us allocate
FLOAT32_MAX = 3.4028234663852886e38
BIAS_VALUES = ("none", "all", "lora_only")
UNSUPPORTED = {"use_dora": "DoRA", "bias": "trained biases", "lora_bias": "a bias on lora_B",
               "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA",
               "target_parameters": "LoRA on raw parameters", "trainable_token_indices": "trainable tokens",
               "layer_replication": "layer replication"}  # PEFT features whose weights mean more than B @ A


def shown(value: object) -> str:
    """repr(value), cut short: a 400-digit number or a megabyte string would flood the message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number within float's range; true and false are not numbers here, though Python counts them
    as ints."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_rank(r: object, what: str = "r") -> int:
    """The one check of a LoRA rank: a positive integer (not true/false, not 8.0, at most MAX_RANK)."""
    if is_count(r) and r <= MAX_RANK:
        return r
    raise LoraError(f"{what} must be a positive integer, got {shown(r)}; LoRA ranks are usually 4 to 64"
                    + (f" and never above {MAX_RANK:,}" if is_count(r) else ""))


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's use_rslora)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_number(value: object, what: str) -> float:
    if is_number(value):
        return value
    raise LoraError(f"{what} must be a finite number, got {shown(value)}")


# ---------------------------------------------------------------- tensor key names

def peft_key(module_name: str, part: str, embedding: bool) -> str:
    suffix = f"lora_embedding_{part}" if embedding else f"lora_{part}.weight"
    return f"{PEFT_PREFIX}{module_name}.{suffix}"


class PeftKey(NamedTuple):
    module: str
    part: str  # "A" or "B"
    embedding: bool


def parse_peft_key(key: str) -> PeftKey | None:
    """'base_model.model.x.lora_A.weight' -> ('x', 'A', False); None for keys that are not LoRA weights."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix, part, embedding in ((".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
                                    (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True)):
        if name.endswith(suffix):
            return PeftKey(name[: -len(suffix)], part, embedding)
    return None


# ---------------------------------------------------------------- adapter_config.json written

def _short_target_names(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT-style suffixes ('q_proj') when they select exactly `names`; vLLM and TGI expect these."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in short]
    return short if selected == list(names) else list(names)


def adapter_config(model: nn.Module, layers: Mapping[str, "LoraLayer"], base_name: str) -> dict[str, Any]:
    """adapter_config.json for the model's LoRA layers: the most common r and alpha, the others as patterns."""
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for layer in layers.values()).most_common(1)[0][0]
    dropout = next((m.p for layer in layers.values() for m in [layer.lora_dropout] if isinstance(m, nn.Dropout)), 0.0)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _short_target_names(model, list(layers)),
        "rank_pattern": {n: layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {n: layer.lora_alpha for n, layer in layers.items() if layer.lora_alpha != alpha},
        "use_rslora": any(layer.use_rslora for layer in layers.values()),
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "revision": None,
    }


# ---------------------------------------------------------------- adapter_config.json read

def _check_patterns(patterns: object, file: str, field: str, check_value: Any) -> None:
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise LoraError(f"{file}: {field} must be an object {{module name or regex: value}}, "
                        f"not {type(patterns).__name__}")
    if len(patterns) > MAX_PATTERNS:
        raise LoraError(f"{file}: {field} has {len(patterns):,} keys, more than the {MAX_PATTERNS:,} allowed "
                        "(one per module is the most a checkpoint needs)")
    for key, value in patterns.items():
        check_value(value, f"{file}: {field}[{shown(key)}]")
        check_pattern(key, f"{file}: {field} key {shown(key)}")


def check_config(config: object, file: str) -> dict[str, Any]:
    """`config` if adapter_config.json describes a plain LoRA adapter, else a LoraError naming `file` and the field."""
    if not isinstance(config, dict):
        raise LoraError(f"{file} must be a JSON object of LoRA settings, not {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{file} describes a {shown(config['peft_type'])} adapter; only LoRA adapters (peft_type LORA) "
                        "are supported")
    check_rank(config.get("r", 8), f"{file}: r")
    check_number(config.get("lora_alpha", 8), f"{file}: lora_alpha")
    dropout = config.get("lora_dropout", 0.0)
    if not (is_number(dropout) and 0 <= dropout <= 1):
        raise LoraError(f"{file}: lora_dropout must be a number from 0 to 1, got {shown(dropout)}")
    for key in ("use_rslora", "use_dora", "lora_bias", "use_qalora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):  # "false" would count as true
            raise LoraError(f"{file}: {key} must be true or false, got {shown(config[key])}")
    _check_patterns(config.get("rank_pattern"), file, "rank_pattern", check_rank)
    _check_patterns(config.get("alpha_pattern"), file, "alpha_pattern", check_number)
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise LoraError(f"{file}: target_modules must be a list of module names or a regex string, "
                        f"got {shown(targets)}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise LoraError(f"{file}: base_model_name_or_path must be a string, got {shown(base)}")
    bias = config.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise LoraError(f"{file}: bias must be one of {', '.join(BIAS_VALUES)}, got {shown(bias)}")
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False, "none", [], {}):
            raise LoraError(f"{file} uses {why} ({key}={shown(config[key])}), which this project does not apply; "
                            "re-train it as plain LoRA")
    extra = config.get("modules_to_save")
    if extra is not None and not isinstance(extra, list):
        raise LoraError(f"{file}: modules_to_save must be a list or null, got {shown(extra)}")
    if extra:
        raise LoraError(f"{file} also saves full modules {shown(extra)} (modules_to_save); only LoRA weights can be "
                        "swapped, re-train without modules_to_save")
    return config


class ModuleSettings(NamedTuple):
    """What a checked adapter_config.json gives one module."""
    r: int
    alpha: float
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora


def module_settings(config: dict[str, Any], name: str, file: str) -> ModuleSettings:
    """Module `name`'s rank, alpha and scale (rank_pattern and alpha_pattern first, as PEFT reads them).

    The scale multiplies every update in float32, so one past float32's range is refused naming the field.
    """
    r = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
    key = pattern_key(config.get("alpha_pattern"), name)
    alpha, field = ((config["alpha_pattern"][key], f"alpha_pattern[{shown(key)}]") if key is not None
                    else (config.get("lora_alpha", 8), "lora_alpha"))
    scaling = lora_scaling(r, alpha, config.get("use_rslora", False))
    if not abs(scaling) <= FLOAT32_MAX:
        rule = "alpha / sqrt(r)" if config.get("use_rslora", False) else "alpha / r"
        raise LoraError(f"{file}: {field} {shown(alpha)} gives {name} a scale ({rule}) of {scaling:.3g}, past "
                        "float32's range, so every update would be Inf or NaN; the adapter is corrupt")
    return ModuleSettings(r, alpha, scaling)
