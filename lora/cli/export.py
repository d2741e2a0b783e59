"""`lora export`: a task adapter as a llama.cpp adapter GGUF, a merged GGUF or model folder, or an Ollama folder."""
import argparse
import os

from ..errors import LoraError
from ..export import FORMATS, base_gguf_of, export
from ..registry import read_mapper

NEXT_STEP = {
    "gguf-adapter": "llama-cli -m {base} --lora {out}",
    "gguf-merged": "llama-cli -m {out}",
    "merged": "AutoModelForCausalLM.from_pretrained({out!r}), or: vllm serve {out}",
    "ollama": "ollama create {name} -f {out}/Modelfile && ollama run {name}",
}


def adapter_path(adapter: str, mapper: str | None) -> str:
    """A task name from --mapper, else the checkpoint folder or .gguf file itself."""
    tasks = read_mapper(mapper)
    if adapter in tasks:
        return tasks[adapter]
    if not os.path.exists(adapter):
        known = f"; tasks in {mapper}: {', '.join(tasks) or 'none'}" if mapper else ""
        raise LoraError(f"--adapter {adapter} is neither a checkpoint folder nor a .gguf file here{known}")
    return adapter


def run(args: argparse.Namespace) -> None:
    path = adapter_path(args.adapter, args.mapper)
    written = export(args.model, path, args.format, args.out, outtype=args.outtype, base_gguf=args.base_gguf)
    name = os.path.basename(os.path.normpath(args.adapter if args.adapter != path else path)).replace(".gguf", "")
    base = base_gguf_of(args.model, args.base_gguf) or "BASE.gguf"
    print(f"wrote {written} ({size(written) / 1e6:.1f} MB)")
    print("next: " + NEXT_STEP[args.format].format(base=base, out=written, name=name))


def size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2-135m", help="the base model: local HF model folder, or smollm2-135m")
    p.add_argument("--adapter", required=True, help="checkpoint folder, llama.cpp .gguf adapter, or a task of --mapper")
    p.add_argument("--mapper", help="JSON file {task: checkpoint dir}, or a folder of checkpoints")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="gguf-adapter (llama.cpp --lora), gguf-merged (one GGUF file), merged (transformers/vLLM "
                        "folder), ollama (adapter + Modelfile)")
    p.add_argument("--out", required=True, help="the file (GGUF formats) or folder (merged, ollama) to write")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"],
                   help="tensor type of what is written (adapters: f32 or f16, default f32; gguf-merged: the "
                        "changed tensors, default f16)")
    p.add_argument("--base-gguf", "--base_gguf", dest="base_gguf",
                   help="the base model as a GGUF file (gguf-merged, ollama's FROM); default: smollm2-135m's own")
    return p
