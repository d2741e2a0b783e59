"""The base model's fingerprint an adapter records, and the check that a model is that base."""
import functools
import hashlib
from collections.abc import Callable

import torch
import torch.nn as nn

from .errors import LoraError
from .layers import LoraLayer
from .peft_format import is_count, is_number

WeightOf = Callable[[str], torch.Tensor]  # module name -> its untouched base weight


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    weight = (module.base_layer if isinstance(module, LoraLayer) else module).weight
    assert isinstance(weight, torch.Tensor)
    return weight


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


def fingerprint_mismatch(expected: dict, model: nn.Module | None, weight_of: WeightOf | None = None) -> str | None:
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
