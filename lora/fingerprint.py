"""The base model's fingerprint an adapter records, and the check that a model is that base."""
import functools
import hashlib
from collections.abc import Callable

import torch
import torch.nn as nn

from .errors import LoraError
from .layers import LoraLayer
from .peft_format import is_count, is_number
from .quant import dense_weight, is_quantized

WeightOf = Callable[[str], torch.Tensor]  # module name -> its untouched base weight (de-quantized where packed)
# How far a sample's (signed sum, absolute sum) may move, as a share of its absolute sum: float32, bfloat16 and
# float16 copies of one model stay within 1%. Quantized weights move more (measured on SmolLM2, worst layer:
# nf4 0.6% and 1.0%, fp4 0.8% and 2.3%, int8 0.05%), and an adapter trained on nf4 and loaded on fp4 by both.
TOLERANCE = (1e-2, 1e-2)
# Where either side is quantized. Models trained apart differ in their weights' scale far more; two random models
# of one initialisation may not (their sums differ by about 2%).
QUANTIZED_TOLERANCE = (2e-2, 5e-2)


def base_module(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, LoraLayer) else module


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The module's base weight as floats: a quantized layer's de-quantized, so float and quantized bases compare."""
    return dense_weight(base_module(model, name))


def any_quantized(model: nn.Module, names: list[str]) -> bool:
    """Whether any of these modules' base layers holds packed (quantized) weights."""
    modules = dict(model.named_modules())
    return any(is_quantized(base_module(model, n)) for n in names if n in modules)


def _sample(weight: torch.Tensor, n: int = 4096) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // n)][:n].float().cpu()


def fingerprint(model: nn.Module | None, names: list[str], weight_of: WeightOf | None = None) -> dict:
    """Shapes of the targeted weights plus a hash and summary statistics of a fixed sample of each.

    The hash is over bfloat16-rounded values, so a model loaded in float32 or bfloat16 hashes the
    same; the statistics let a float16 copy of the same model match within tolerance.
    """
    if weight_of is None:
        if model is None:
            raise ValueError("fingerprint needs a model or weight_of")
        weight_of = functools.partial(base_weight, model)
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


def fingerprint_mismatch(expected: dict, model: nn.Module | None, weight_of: WeightOf | None = None,
                         tolerance: tuple[float, float] = TOLERANCE) -> str | None:
    """None when `model` is the base `expected` was taken from, else a short reason.

    `tolerance`: how far each sample's (signed, absolute) sums may move, as shares of its absolute sum
    (QUANTIZED_TOLERANCE where either side is quantized)."""
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
        slack = abs_total + 1e-4
        if abs(got_total - total) > tolerance[0] * slack or abs(got_abs - abs_total) > tolerance[1] * slack:
            return f"the weights of {name} differ from those the adapter was trained on"
    return None


def check_fingerprint(fp: object, file: str) -> None:
    """Raise a LoraError naming `file` unless `fp` is a well-formed base_fingerprint (as `fingerprint` writes)."""
    if not isinstance(fp, dict):
        raise LoraError(f"{file}: base_fingerprint must be an object or null, got {fp!r}")
    shapes, stats = fp.get("shapes"), fp.get("stats", {})
    if not (isinstance(shapes, dict) and all(isinstance(v, list) and all(is_count(n) for n in v)
                                             for v in shapes.values())):
        raise LoraError(f"{file}: base_fingerprint.shapes must map module names to weight shapes; re-save the adapter")
    if not (isinstance(stats, dict) and all(k in shapes and isinstance(v, list) and len(v) == 2 and
                                            all(map(is_number, v)) for k, v in stats.items())):
        raise LoraError(f"{file}: base_fingerprint.stats must map module names to two finite numbers; "
                        "re-save the adapter")
    if fp.get("sha256") is not None and not isinstance(fp["sha256"], str):
        raise LoraError(f"{file}: base_fingerprint.sha256 must be a string or null, got {fp['sha256']!r}")
