"""The finetune run's settings: one typed record, its defaults and help, and the one check of every setting's range.

Each field is one `lora finetune` flag of the same name (the names PEFT, transformers and TRL users know);
lora.train_args turns the fields into argparse flags, so a new setting is one field here and nothing else.
"""
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .data import FORMAT_KEYS
from .errors import LoraError
from .quant import METHODS, TRAIN_METHODS, check_quantization

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("bf16", "fp16")  # --mixed_precision: the autocast dtype's short name
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # lora.models.resolve_dtype's names


def flag(default: Any = MISSING, help: str = "", choices: tuple[str, ...] | None = None) -> Any:  # noqa: ANN401
    """A field that is also a flag: no default makes the flag required."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `lora finetune` and `lora.finetune` take; `check()` refuses the first setting out of range."""
    # ---- model, adapter shape and data
    model_name_or_path: str = flag(help="local HF model folder, or smollm2-135m")
    target_modules_path: str = flag(help="text file: one module name/suffix/regex per line, or all-linear")
    prompt_format_path: str | None = flag(
        None, "text file with {instruction} and optionally {input} (Alpaca data only; chat data uses the "
              "tokenizer's chat template)")
    train_data_path: str = flag(
        help="JSON list or JSONL of Alpaca records, OpenAI-style messages or ShareGPT conversations")
    data_format: str = flag("auto", "the records' format (auto: from the first record)", ("auto", *FORMAT_KEYS))
    response_schema: str | None = flag(
        None, "JSON schema file every answer of this task must match; stored in lora_task.json, applied to every "
              "request to the task unless the request asks otherwise")
    train_on_inputs: bool = flag(
        False, "loss on prompts too, not only on answers (each assistant turn and its end-of-turn token)")
    packing: bool = flag(False, "pack examples into rows of --max_seq_length; attention does not cross examples")
    group_by_length: bool = flag(
        False, "batch examples of similar length together (less padding); still a function of seed and epoch")
    validation_data_path: str | None = flag(None, "data for the validation loss/perplexity")
    checkpoint_dir: str = flag("checkpoint", "where epoch-N/, step-K/, best/ and final/ go")
    load_from_checkpoint: str = flag("", "checkpoint to resume from (or to start from)")
    allow_changed_settings: bool = flag(
        False, "resume even if flags that change the run (batch size, seed, learning rate...) differ from the "
               "checkpoint's, with a warning")
    seed: int = flag(42)
    lora_rank: int = flag(8)
    lora_alpha: float = flag(16)
    lora_dropout: float = flag(0.05)
    use_rslora: bool = flag(False, "scale by alpha/sqrt(r) instead of alpha/r")
    # ---- optimisation
    batch_size: int = flag(8, "examples per process per micro-step; the global batch is batch_size x processes x "
                              "gradient_accumulation_steps")
    gradient_accumulation_steps: int = flag(1)
    learning_rate: float = flag(3e-4)
    weight_decay: float = flag(0.0)
    lr_scheduler: str = flag("linear", choices=SCHEDULERS)
    warmup_steps: int = flag(0)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this (0: no clipping)")
    num_epochs: int = flag(1)
    max_steps: int = flag(0, "stop after this many optimizer steps (0: no limit)")
    max_seq_length: int = flag(512)
    save_steps: int = flag(0, "also save step-K/ every K optimizer steps")
    eval_steps: int = flag(0, "also compute the validation loss every K optimizer steps (it always runs after each "
                              "epoch and at the end)")
    early_stopping_patience: int = flag(
        0, "stop when the validation loss has not improved for N validations in a row, keeping the best adapter "
           "in best/ (0: off)")
    # ---- how the base model is loaded and run
    dtype: str = flag("float32", "base model dtype: float32, bfloat16 or float16", DTYPES)
    quantize: str | None = flag(
        None, "QLoRA: quantize the frozen base's linear layers (not its output head) at load: nf4 or fp4 (4-bit), "
              "int8 (8-bit LLM.int8()), all bitsandbytes; w8a16 (int8 weights, bfloat16 activations, no "
              "bitsandbytes needed). LoRA weights stay float32 (w4a16 serves only)", METHODS)
    double_quant: bool = flag(False, "nf4/fp4: quantize the 4-bit block scales too (QLoRA's double quantization)")
    compute_dtype: str | None = flag(None, "nf4/fp4: the dtype 4-bit matmuls run in (default float32)",
                                     ("float32", "bfloat16", "float16"))
    mixed_precision: str | None = flag(
        None, "autocast the forward pass to bf16 or fp16; LoRA weights and optimizer stay float32 (fp16 adds loss "
              "scaling)", PRECISIONS)
    gradient_checkpointing: bool = flag(
        False, "recompute each layer's activations in backward instead of keeping them: less memory, about a third "
               "more compute")
    compile: bool = flag(False, "torch.compile the model body")
    device: str = flag("auto", "cpu, cuda, cuda:1 ... (auto: cuda if available)")
    checkpoint_device: str = flag("cpu", "device resume state is loaded onto first")
    evaluate: bool | None = flag(None, "validation loss/perplexity (default: on when validation data is given)")
    nproc_per_node: int = flag(1, "train in N processes on this machine (runs torchrun; one GPU each on CUDA)")

    def __post_init__(self) -> None:
        for f in fields(self):  # library callers pass pathlib paths; the run records plain strings
            if isinstance(getattr(self, f.name), os.PathLike):
                setattr(self, f.name, os.fspath(getattr(self, f.name)))

    def check(self) -> None:
        """One LoraError for the first setting of the wrong type or out of range."""
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            value, allowed = getattr(self, f.name), _types(hints[f.name])
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise LoraError(f"--{f.name} must be {names}, got {value!r}")
            if f.metadata["choices"] and value is not None and value not in f.metadata["choices"]:
                raise LoraError(f"--{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "max_seq_length",
                     "nproc_per_node"):
            if getattr(self, name) <= 0:
                raise LoraError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps", "eval_steps", "warmup_steps", "early_stopping_patience",
                     "max_grad_norm", "weight_decay", "learning_rate"):
            if not getattr(self, name) >= 0:  # `not >=` also refuses NaN
                raise LoraError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lora_alpha > 0:  # alpha 0 makes the update zero: an adapter that never changes anything
            raise LoraError(f"--lora_alpha must be positive, got {self.lora_alpha}; the usual choice is twice "
                            "--lora_rank")
        if not 0 <= self.lora_dropout < 1:
            raise LoraError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.evaluate and not self.validation_data_path:
            raise LoraError("--evaluate needs --validation_data_path")
        if self.early_stopping_patience and not (self.validation_data_path and self.evaluate is not False):
            raise LoraError("--early_stopping_patience watches the validation loss: add --validation_data_path")
        if self.quantize in METHODS and self.quantize not in TRAIN_METHODS:
            raise LoraError(f"--quantize {self.quantize} is for serving (its int4 kernel has no backward); train over "
                            f"nf4 or w8a16 (or a float base) and serve the adapter with --quantize {self.quantize}")
        if self.quantize is not None:
            check_quantization(self.quantize, self.double_quant, self.compute_dtype)
        elif self.double_quant or self.compute_dtype is not None:
            raise LoraError(f"--{'double_quant' if self.double_quant else 'compute_dtype'} applies to a quantized "
                            "base: add --quantize nf4 (or fp4)")
        if self.packing and self.group_by_length:
            raise LoraError("--group_by_length has nothing to group with --packing (packed rows are all about "
                            "--max_seq_length long); use one of them")

    @property
    def evaluates(self) -> bool:
        """--evaluate, or when not given, whether there is validation data."""
        return bool(self.validation_data_path) if self.evaluate is None else self.evaluate


def _types(hint: Any) -> tuple[type, ...]:  # noqa: ANN401 - a type annotation
    """The classes a field's annotation allows: `float` takes an int too, `X | None` takes None."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(t for a in allowed for t in ((float, int) if a is float else (a,)))
