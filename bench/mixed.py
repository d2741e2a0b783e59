"""The cost of one mixed-task step with 1, 8, 32 and 64 distinct tasks among the same tokens.

    .venv/bin/python bench/mixed.py                       # SmolLM2-135M, 64 decode rows, float32, 1 thread
    .venv/bin/python bench/mixed.py --shape llama-1b      # a 1B-shaped Llama, random weights, rank 16 on all linears
    .venv/bin/python bench/mixed.py --tokens 8 --tasks 1,8 --repeats 1   # a quick check that it runs
    .venv/bin/python bench/mixed.py --tokens 8 --tasks 1,3,8 --prepack   # as the engine's eager decode steps run

One step is a decode-shaped forward: --tokens sequences of one token each, token i for task i % k, over the
base weights with each token's own task's low-rank update. Per k it times:
  segmented  lora.mixed: each task's A and B applied to its own tokens (from preallocated adapter slots), the
             step planned once: few tokens over few neighbouring slots take them all at once (three ops a
             layer), others are grouped by task, so the cost follows the tokens
  stacked    the implementation before it (kept here as the reference): every task's A and B stacked along
             the rank, every token multiplied by every task's ranks and the others' zeroed
and, once, the base model alone (what a step of one task costs on its merged weights). With --prepack every
linear layer runs on its oneDNN-prepacked weight (lora.engine.packed), as the engine's eager decode steps of
several rows do on a CPU in float32, so the base alone is the engine's merged step. The goal: a step with
64 tasks at most 1.3x a step with one task. Configurations take turns within each repeat and each keeps its
best; with one thread on the CPU (the default) the clock is the process's CPU time, which other processes on
a shared machine change far less than wall time; else wall time. Both implementations' logits are compared.
"""
import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import torch
import transformers
from machine import clock, cpu_model

import lora
from lora.checkpoint import Adapter, ModuleAdapter
from lora.engine.packed import PackedLinears, can_prepack
from lora.mixed import AdapterSlots, MixedAdapters

SHAPES = {"llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8)}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m", help="the model (with --shape: whose tokenizer's vocabulary to use)")
p.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised model of this shape instead")
p.add_argument("--tokens", type=int, default=64, help="tokens (decode rows) in the step")
p.add_argument("--tasks", default="1,8,32,64", help="comma-separated numbers of distinct tasks in the step")
p.add_argument("--rank", type=int, help="adapter rank (default 8; 16 with --shape)")
p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is CPU time")
p.add_argument("--prepack", action="store_true", help="linear layers on prepacked weights, as the engine's steps")
args = p.parse_args()
torch.set_num_threads(args.threads)
CLOCK, CPU = clock(args.threads)
CLOCK_NAME = f"{CPU}ms"
counts = [int(k) for k in args.tasks.split(",")]
rank = args.rank or (16 if args.shape else 8)
dtype = getattr(torch, args.dtype)


def base_model() -> torch.nn.Module:
    if not args.shape:
        return lora.load_model(args.model, dtype=args.dtype, device="cpu")[0].eval()
    config = transformers.LlamaConfig(vocab_size=lora.load_model(args.model)[1].vocab_size, **SHAPES[args.shape])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_adapter(model: torch.nn.Module, seed: int) -> Adapter:
    """Rank-`rank` A and B drawn from N(0, 0.02) on every linear layer of the decoder (PEFT's all-linear)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            modules[name] = ModuleAdapter(torch.randn(rank, module.in_features, generator=generator) * 0.02,
                                          torch.randn(module.out_features, rank, generator=generator) * 0.02, 2.0)
    return Adapter(f"random-{seed}", modules, {})


class Stacked:
    """The reference: every task's A and B stacked along the rank; a per-token row of scales zeroes the others."""

    def __init__(self, model: torch.nn.Module, adapters: list[Adapter]) -> None:
        self.hooks = []
        for name in adapters[0].modules:
            items = [a.modules[name] for a in adapters]
            A = torch.cat([m.A for m in items]).T
            B = torch.cat([m.B for m in items], dim=1).T
            scales = torch.zeros(len(items) + 1, A.shape[1])
            for i, m in enumerate(items):
                scales[i + 1, i * rank:(i + 1) * rank] = m.scaling
            self.hooks.append((model.get_submodule(name), self.hook(A, B, scales)))
        self.index = torch.zeros(1, dtype=torch.long)

    def hook(self, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor):
        def add(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            update = ((inputs[0].float() @ A) * scales[self.index]) @ B
            return (out.float() + update).to(out.dtype)
        return add


def hooked(model: torch.nn.Module, ids: torch.Tensor, hooks: list) -> torch.Tensor:
    """The step's logits with these forward hooks on the model."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def segmented(model: torch.nn.Module, ids: torch.Tensor, mixed: MixedAdapters, index: torch.Tensor) -> torch.Tensor:
    """The step's logits with lora.mixed's updates; grouping the tokens by task is part of the step."""
    mixed.select(index)
    with mixed.attached():
        return model(input_ids=ids, use_cache=False).logits


def main() -> None:
    t0 = time.perf_counter()
    model = base_model()
    adapters = [random_adapter(model, seed) for seed in range(max(counts))]
    print(f"built the model and {len(adapters)} adapters in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    slots = AdapterSlots(model, torch.float32, max(counts))
    by_name = {a.path: a for a in adapters}
    acquire = lambda names: slots.acquire([(n, 0) for n in names], by_name.__getitem__)  # noqa: E731
    ids = torch.randint(0, model.config.vocab_size, (args.tokens, 1), generator=torch.Generator().manual_seed(0))
    if args.prepack and not can_prepack(torch.device("cpu"), dtype):
        sys.exit("--prepack needs float32 and a PyTorch with oneDNN")
    packed = PackedLinears(model) if args.prepack else None
    steps: dict[str, Callable[[], torch.Tensor]] = {"base": lambda: hooked(model, ids, [])}
    for k in counts:
        index = torch.tensor([[i % k + 1] for i in range(args.tokens)])
        stacked = Stacked(model, adapters[:k])
        stacked.index = index
        mixed = MixedAdapters(slots, [a.path for a in adapters[:k]], acquire)
        steps[f"segmented {k}"] = functools.partial(segmented, model, ids, mixed, index)
        steps[f"stacked {k}"] = functools.partial(hooked, model, ids, stacked.hooks)
        with torch.no_grad():  # the two compute the same update
            torch.testing.assert_close(steps[f"segmented {k}"](), steps[f"stacked {k}"](), atol=1e-3, rtol=1e-3)
    best = {name: float("inf") for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            with torch.no_grad(), packed.attached(None, args.tokens) if packed else contextlib.nullcontext():
                start = CLOCK()
                step()
                best[name] = min(best[name], (CLOCK() - start) * 1000)
    print(f"# {args.shape or args.model}, {args.dtype}, {args.tokens} decode rows, rank {rank} on every decoder "
          f"linear, {'prepacked weights, ' if packed else ''}{args.threads} thread(s), {cpu_model()}, torch {torch.__version__}; best of {args.repeats}, "
          f"{CLOCK_NAME}")
    print(f"base model alone (one task on merged weights): {best['base']:.1f}")
    print("| tasks | segmented | x 1 task | stacked | x 1 task |\n|---:|---:|---:|---:|---:|")
    first = counts[0]
    for k in counts:
        seg, stk = best[f"segmented {k}"], best[f"stacked {k}"]
        print(f"| {k} | {seg:.1f} | {seg / best[f'segmented {first}']:.2f} | {stk:.1f} | "
              f"{stk / best[f'stacked {first}']:.2f} |")


if __name__ == "__main__":
    main()
