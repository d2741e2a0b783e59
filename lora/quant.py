"""Quantized base models: replace a model's frozen Linear layers with 4-bit or 8-bit ones (QLoRA) and back.

    nf4, fp4   bitsandbytes Linear4bit: blockwise 4-bit weights (QLoRA's NF4, or FP4), optional double
               quantization of the block scales, matmuls in a compute dtype (default float32, as transformers')
    int8       bitsandbytes Linear8bitLt: LLM.int8() (int8 weights, one scale per output row)
    w8a16      Int8Linear (lora.int8): the int8 values of `int8` (row scales rounded to bfloat16), bfloat16 activations,
               run by PyTorch's int8 weight-only kernel aten._weight_int8pack_mm on CPU (what torchao's
               int8 weight-only config uses there); needs no bitsandbytes. For serving (decode reads every
               weight once per token: a quarter of float32's bytes), and it trains too.
    w4a16      Int4Linear (lora.int4): int4 weights in groups of 32 with a scale and a minimum each (llama.cpp's
               Q4_1), bfloat16 activations, PyTorch's int4 CPU kernel; the default model's GGUF blocks are taken as
               they are; a quantized head gets w8a16's int8 rows. Serving only (no backward), CPU only; a layer whose
               shape the kernel cannot take stays float.

The output head stays in full precision, as transformers' bitsandbytes loader leaves it (w8a16 can take it
too: `head=True`, what serving does by default, see serving_head: a tied head is a large share of the bytes
read per token), so `nf4`, `fp4` and `int8` give the model
`from_pretrained(..., quantization_config=BitsAndBytesConfig(**record))` loads, `record =
quantization_config(...)` being what PEFT, transformers and vLLM read for such a base (equal
logits; but 4-bit layers here never switch to bitsandbytes' eval-only CPU repacking, see _bnb_linear).
LoRA layers wrap these modules like any Linear; merging into them is refused (packed weights cannot
take a merged task): `dequantize_model` gives float Linears back for merge and export. lora.load_model does not
call quantize_model on a loaded model: lora.quant_load quantizes each layer with quantize_linear as it is read.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import LoraError
from .int4 import Int4Linear, fits
from .int8 import Int8Linear
from .layers import LoraLayer

BNB_METHODS = ("nf4", "fp4", "int8")
TRAIN_METHODS = (*BNB_METHODS, "w8a16")
METHODS = (*TRAIN_METHODS, "w4a16")  # w4a16 serves only: its int4 kernel has no backward
HEAD_METHODS = ("w8a16", "w4a16")  # the ones whose output head can be quantized too (serving)
BNB_VERSION = "0.50.2"  # the version tested here (CPU backend with torch 2.13)
LLM_INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default: activation outliers above it stay 16-bit
RECORD_ATTR = "lora_quantization"  # where quantize_model leaves its record on the model
COMPUTE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class Quantization:
    """How a base model's Linear layers were quantized."""

    method: str
    double_quant: bool = False
    compute_dtype: str | None = None  # nf4/fp4 matmul dtype (transformers' default: float32)
    head: bool = False  # the output head quantized too (w8a16, w4a16)


def check_quantization(method: str, double_quant: bool = False, compute_dtype: str | None = None,
                       head: bool = False) -> Quantization:
    """The record for these settings, or a LoraError naming the bad one and the choices."""
    if method not in METHODS:
        raise LoraError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)} (nf4 and fp4: "
                        "4-bit QLoRA; int8: 8-bit; w8a16, w4a16: int8 or int4 weights for fast CPU serving)")
    if double_quant and method not in ("nf4", "fp4"):
        raise LoraError(f"--double_quant quantizes 4-bit block scales; it applies to nf4 and fp4, not {method}")
    if compute_dtype is not None:
        if method not in ("nf4", "fp4"):
            raise LoraError(f"--compute_dtype applies to nf4 and fp4 (int8, w8a16 and w4a16 pick their own kernels), "
                            f"not {method}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise LoraError(f"unknown compute dtype {compute_dtype!r}; use one of float32, bfloat16, float16")
        compute_dtype = COMPUTE_DTYPES[compute_dtype]
    elif method in ("nf4", "fp4"):
        compute_dtype = "float32"
    if head and method not in HEAD_METHODS:
        raise LoraError(f"quantizing the output head is offered for w8a16 and w4a16 (serving), not {method}: "
                        "bitsandbytes bases keep it in full precision, as PEFT and transformers expect")
    return Quantization(method, double_quant, compute_dtype, head)


def serving_head(method: str | None, head: bool | None) -> bool:
    """Whether a base served over `method` gets its output head quantized: `head` if given, else yes for w8a16
    and w4a16, whose head gets int8 rows (llama.cpp's Q8_0 files hold the head in 8 bits too; it moves SmolLM2's
    logits a third as far as quantizing its linear layers does) and no for bitsandbytes methods, which keep it in
    full precision."""
    if head and method is None:
        raise LoraError("quantizing the output head needs a quantized base: add --quantize int8 (w8a16)")
    return method in HEAD_METHODS if head is None else head


def import_bitsandbytes(method: str) -> Any:
    """The bitsandbytes module, or a LoraError saying how to install it."""
    # On CPUs with AVX512-BF16 bitsandbytes 0.50 tries to fetch a kernel from the Hugging Face Hub at import
    # (nothing is downloaded here) and logs a warning when it cannot: that warning is not the user's problem.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise LoraError(f"--quantize {method} needs bitsandbytes: pip install 'lora-pytorch[quant]' (or "
                        f"bitsandbytes=={BNB_VERSION}); --quantize w8a16 needs nothing extra") from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def _bnb_linear(bnb: Any, linear: nn.Linear, q: Quantization, device: Any) -> nn.Linear:
    """A bitsandbytes layer holding `linear`'s weight, quantized on `device` (bitsandbytes does it on .to)."""
    weight = linear.weight.detach()
    if q.method == "int8":
        weight = weight.cpu()  # Int8Params quantizes only when moved off the CPU
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                     has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD, device="meta")
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                   compute_dtype=getattr(torch, str(q.compute_dtype)),
                                   compress_statistics=q.double_quant, quant_type=q.method, device="meta")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=q.double_quant,
                                          quant_type=q.method, module=module)
        # bitsandbytes 0.50 repacks 4-bit weights for its bfloat16 CPU kernel on the first eval-mode forward:
        # that rewrites the base (its scales rounded to bfloat16) and later training forwards run a kernel
        # with no backward, so LoRA layers below it silently get no gradient. Keep the one exact path.
        module.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to(device)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (transformers' get_output_embeddings), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    return None if get_head is None else get_head()


def quantizable(model: nn.Module, head: bool = False) -> list[str]:
    """Names of the plain Linear layers quantize_model replaces, in model order: all but the output head,
    unless `head`."""
    output = None if head else output_head(model)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not output]


def quantize_model(model: nn.Module, method: str, double_quant: bool = False, compute_dtype: str | None = None,
                   device: Any = None, head: bool = False) -> list[str]:
    """Quantize `model`'s Linear layers (not its output head, unless `head`) in place; returns their names.

    Each layer is quantized on `device` (default: where its weight is) and its float weight dropped as it
    goes (a tied head's stays: it is the input embedding too). Do it before adding LoRA layers; the record
    is left on the model (see model_quantization).
    """
    q = check_quantization(method, double_quant, compute_dtype, head)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError("quantize the base model before adding LoRA layers: load a fresh base model, quantize it, "
                        "then inject or load the adapter")
    if getattr(model, RECORD_ATTR, None) is not None:
        raise LoraError(f"this model is already quantized ({getattr(model, RECORD_ATTR)['method']}); load a fresh "
                        "base model to quantize it another way")
    names, output = quantizable_names(model, q), output_head(model)
    for name in names:
        linear: Any = model.get_submodule(name)
        if linear.weight.device.type == "meta":
            raise LoraError(f"{name} is on the meta device; load the model's weights before quantizing it")
        model.set_submodule(name, quantize_linear(linear, q, device, head=linear is output))
    mark_quantized(model, q)
    return names


def quantizable_names(model: nn.Module, q: Quantization) -> list[str]:
    """quantizable(model, q.head), or a LoraError where there is none (or bitsandbytes is missing)."""
    if q.method in BNB_METHODS:
        import_bitsandbytes(q.method)
    names = quantizable(model, q.head)
    if not names:
        raise LoraError(f"{type(model).__name__} has no Linear layer to quantize besides its output head "
                        "(Conv1D layers, as in GPT-2, are not quantized)")
    return names


def quantize_linear(linear: nn.Linear, q: Quantization, device: Any = None, head: bool = False) -> nn.Module:
    """The quantized layer standing for `linear` (its float weight is not kept), on `device` (default: where
    the weight is). One layer of quantize_model; loading quantizes each layer with it as its weight is read.
    w4a16 holds the output head (`head`) in int8 rows as w8a16 does, as llama.cpp keeps a 4-bit model's output
    at higher precision: in int4 groups SmolLM2's head moved its logits 9.8%, six times what its int4 layers do."""
    target = device if device is not None else linear.weight.device
    if q.method in BNB_METHODS:
        new = _bnb_linear(import_bitsandbytes(q.method), linear, q, target)
    elif q.method == "w4a16" and not head:
        if not fits(linear.in_features, linear.out_features):
            return linear  # mark_quantized names the layers left float
        new = Int4Linear.from_linear(linear).to(target)
    else:
        new = Int8Linear.from_linear(linear).to(target)
    return new.train(linear.training)


def mark_quantized(model: nn.Module, q: Quantization) -> None:
    """Leave the record on a model whose layers were quantized (see model_quantization)."""
    config: Any = getattr(model, "config", None)
    if q.method == "w4a16" and (left := quantizable(model, q.head)):
        print(f"w4a16: {len(left)} linear layer(s) stay float, their shapes are not the int4 kernel's (in_features a "
              f"multiple of 32, out_features of 16): {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}",
              file=sys.stderr)
    if q.head and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # head and embedding now differ: saved (de-quantized) as two weights
    setattr(model, RECORD_ATTR, asdict(q))


def quantization_config(method: str, double_quant: bool = False, compute_dtype: str | None = None,
                        head: bool = False) -> dict:
    """The `quantization_config` record of a base quantized so: for bitsandbytes methods the fields of
    transformers' BitsAndBytesConfig (what PEFT and vLLM read from a base model's config.json)."""
    q = check_quantization(method, double_quant, compute_dtype, head)
    if q.method == "w8a16":
        return {"quant_method": "w8a16", "bits": 8, "group_size": -1, "symmetric": True,
                "activation_dtype": "bfloat16", "modules_to_not_convert": [] if head else ["lm_head"]}
    if q.method == "w4a16":  # Q4_1's groups: a scale and a minimum (zero point) per 32 weights of a row
        return {"quant_method": "w4a16", "bits": 4, "group_size": 32, "symmetric": False,
                "activation_dtype": "bfloat16", "modules_to_not_convert": [] if head else ["lm_head"],
                "modules_in_int8": ["lm_head"] if head else []}  # a quantized head holds w8a16's int8 rows
    return {"quant_method": "bitsandbytes", "load_in_4bit": q.method != "int8", "load_in_8bit": q.method == "int8",
            "bnb_4bit_quant_type": q.method if q.method != "int8" else "fp4",
            "bnb_4bit_use_double_quant": q.double_quant, "bnb_4bit_compute_dtype": q.compute_dtype or "float32",
            "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": LLM_INT8_THRESHOLD,
            "llm_int8_skip_modules": None, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def model_quantization(model: nn.Module) -> dict | None:
    """The quantization_config record of a model quantized here or by transformers' loader; None if float.

    For the adapter's task metadata (lora_task.json), so the base it was trained on is known."""
    record = getattr(model, RECORD_ATTR, None)
    if record is not None:
        return quantization_config(**record)
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def is_quantized(module: nn.Module) -> bool:
    """True for a Linear whose weight is packed (not a float tensor): LoRA cannot merge into it."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def num_parameters(model: nn.Module) -> int:
    """The parameters a model holds (a tied one once), a packed weight counted as the float weight it stands for."""
    counts: dict[int, int] = {}
    modules: list[Any] = list(model.modules())
    for m in modules:
        for name, p in m.named_parameters(recurse=False):
            counts[id(p)] = m.in_features * m.out_features if name == "weight" and is_quantized(m) else p.numel()
    return sum(counts.values())


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's (out, in) float weight: itself, or a float32 de-quantized copy where it is packed."""
    weight: Any = module.weight
    if not is_quantized(module):
        return weight
    if isinstance(module, (Int8Linear, Int4Linear)):
        return module.dense_weight()
    bnb = import_bitsandbytes("int8" if weight.dtype == torch.int8 else "nf4")
    if isinstance(module, bnb.nn.Linear8bitLt):
        state: Any = module.state
        scb = state.SCB if state.SCB is not None else weight.SCB
        return weight.data.float() * (scb.float() / 127.0).unsqueeze(1)
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    raise LoraError(f"cannot de-quantize a {type(module).__name__}; only bitsandbytes, w8a16 and w4a16 layers are "
                    "known")


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every quantized Linear (inside LoRA layers too) by a float nn.Linear; returns their names.

    The way to merge adapters or export from a quantized base: the result is the de-quantized weights,
    which differ from the original float model's by the quantization error. `dtype` defaults to that of
    the model's other weights (its embedding's), which its activations have.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)]
    if dtype is None:
        dtype = next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n),
                     torch.float32)
    for name in names:
        module: Any = model.get_submodule(name)
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(dense_weight(module).detach().to(dtype, copy=True), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype, copy=True), requires_grad=False)
        model.set_submodule(name, linear.train(module.training))
    if names and hasattr(model, RECORD_ATTR):
        delattr(model, RECORD_ATTR)
    return names
