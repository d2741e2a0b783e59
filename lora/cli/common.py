"""What eval, generate, chat and serve share: model and --quantize flags, loading the MultiTaskModel, prompt formats."""
import argparse

from ..data import load_prompt_format
from ..multitask import MultiTaskModel

BASE_PROMPT = "the model's chat template around '{instruction}\\n\\n{input}'"
# --quantize for running models: int8 means int8 weights on the fastest kernel (w8a16); bitsandbytes' own is bnb-int8
QUANTIZE = {"int8": "w8a16", "w8a16": "w8a16", "w4a16": "w4a16", "nf4": "nf4", "fp4": "fp4", "bnb-int8": "int8"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, base_prompt: str = BASE_PROMPT) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2-135m", help="local HF model folder, or smollm2-135m")
    p.add_argument("--mapper", help="JSON file {task: checkpoint dir}, or a folder of checkpoints")
    p.add_argument("--prompt_format_path", "--prompt-format-path",
                   help=f"prompt format file (default: the task adapter's own; for the base model {base_prompt})")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=positive_int, help="longest answer, in tokens")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    return add_quantize_arguments(p)


def add_quantize_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quantize", choices=list(QUANTIZE),
                   help="run over a quantized base (its linear layers): int8 = int8 weights with bfloat16 "
                        "activations on PyTorch's int8 weight-only kernel (the same int8 values as bitsandbytes' "
                        "LLM.int8(), which is bnb-int8; also named w8a16), the output head too; w4a16: int4 weights "
                        "in groups of 32 (llama.cpp's Q4_1; the default model's GGUF blocks as they are) on PyTorch's "
                        "int4 CPU kernel, the head in int8; nf4 or fp4: bitsandbytes 4-bit, the head kept float. Tasks "
                        "then apply as per-token updates, never as merged weights")
    p.add_argument("--quantize_head", "--quantize-head", action=argparse.BooleanOptionalAction,
                   help="int8/w8a16, w4a16: the output head in int8 too (the default, as llama.cpp's files hold it); "
                        "--no-quantize-head keeps it float")
    p.add_argument("--double_quant", "--double-quant", action="store_true",
                   help="nf4/fp4: quantize the 4-bit block scales too")
    p.add_argument("--compute_dtype", "--compute-dtype", choices=["float32", "bfloat16", "float16"],
                   help="nf4/fp4: the dtype 4-bit matmuls run in (default float32)")
    return p


def quantize_settings(args: argparse.Namespace) -> dict:
    """MultiTaskModel's quantize, double_quant, compute_dtype and quantize_head from the parsed --quantize flags."""
    return {"quantize": QUANTIZE.get(args.quantize or ""), "double_quant": args.double_quant,
            "compute_dtype": args.compute_dtype, "quantize_head": args.quantize_head}


def load_multitask(args: argparse.Namespace) -> MultiTaskModel:
    return MultiTaskModel(args.model, args.mapper, device=args.device, dtype=args.dtype, **quantize_settings(args))


def task_or_base(name: str | None) -> str | None:
    return None if name in (None, "", "base") else name


def base_prompt_format(tokenizer) -> str | None:  # noqa: ANN001 - any HF tokenizer
    """The model's own chat template around '{instruction}\n\n{input}': how an instruct model expects a question.

    None when the tokenizer has no chat template (then MultiTaskModel's plain default applies).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": "{instruction}\n\n{input}"}],
                                         add_generation_prompt=True, tokenize=False)


def prompt_format_for(mt: MultiTaskModel, task: str | None, path: str | None = None) -> tuple[str | None, str]:
    """(prompt format or None, where it comes from): the file at `path`, else the adapter's, else the base model's."""
    if path:
        return load_prompt_format(path), f"prompt format {path}"
    if task is not None:
        return None, "the adapter's prompt format"
    fmt = base_prompt_format(mt.tokenizer)
    return fmt, "the model's chat template" if fmt else "the plain default prompt format"
