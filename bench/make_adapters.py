"""Seeded random-weight LoRA adapters for the serving benchmark: reproducible, offline, nothing downloaded.

    PYTHONPATH=. .venv/bin/python bench/make_adapters.py /tmp/bench-adapters            # task0..task2, SmolLM2
    PYTHONPATH=. .venv/bin/python bench/make_adapters.py /tmp/bench-adapters --tasks 8 --target-modules q_proj,k_proj,v_proj,o_proj

Writes one PEFT checkpoint per task (OUT/task0, OUT/task1, ...) with lora.inject + lora.save_adapter, its A and B
drawn from N(0, --std): random, but shaped like trained adapters and large enough to change greedy answers.
`lora serve --mapper OUT` and vLLM's `--lora-modules task0=OUT/task0 ...` read the same files. Prints the plain
model folder (what vLLM's --model takes) and the flags for both servers.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and adapters are local

import torch

import lora
from lora.models import resolve_model_path


def make_adapters(out, model="smollm2-135m", tasks=3, r=8, alpha=16, target_modules="all-linear", std=0.02, seed=0):
    """Write `tasks` seeded random LoRA checkpoints under `out` and return {task name: folder}.

    Args:
        out: folder to write task0, task1, ... into (each is replaced atomically if it exists).
        model: a local Hugging Face model folder or "smollm2-135m".
        tasks: how many adapters.
        r, alpha: LoRA rank and alpha (vLLM needs --max-lora-rank >= r).
        target_modules: "all-linear" or a list of module names, as lora.inject takes them.
        std: standard deviation of every A and B entry.
        seed: the same seed writes byte-identical weights.
    """
    base, _ = lora.load_model(model, dtype="float32")
    lora.inject(base, target_modules, r=r, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    folders = {}
    for i in range(tasks):
        with torch.no_grad():
            for param in lora.lora_parameters(base):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        folders[f"task{i}"] = lora.save_adapter(base, os.path.join(out, f"task{i}"), base_model_name_or_path=model)
    return folders


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for the adapters (task0, task1, ...)")
    p.add_argument("--model", default="smollm2-135m", help="local HF model folder, or smollm2-135m")
    p.add_argument("--tasks", type=int, default=3, help="how many adapters (vLLM: --max-loras at least this for no swaps)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--target-modules", default="all-linear", help="all-linear, or names joined by commas")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of A and B")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        folders = make_adapters(args.out, args.model, args.tasks, args.r, args.alpha, targets, args.std, args.seed)
        model_folder = resolve_model_path(args.model)
    except lora.LoraError as e:
        sys.exit(f"error: {e}")
    modules = " ".join(f"{name}={os.path.abspath(path)}" for name, path in folders.items())
    print(f"wrote {', '.join(folders)} under {args.out}\n"
          f"model folder: {model_folder}\n"
          f"lora serve:   lora serve --model {args.model} --mapper {args.out}\n"
          f"vLLM:         python -m vllm.entrypoints.openai.api_server --model {model_folder} --enable-lora "
          f"--max-loras {args.tasks} --max-lora-rank {args.r} --lora-modules {modules} --dtype float32")


if __name__ == "__main__":
    main()
