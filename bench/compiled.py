"""Single-stream decode speed of the engine, eager vs its compiled decode step, same tokens.

    .venv/bin/python bench/compiled.py                    # SmolLM2-135M, float32, 1 thread, 100-token prompt, 64 tokens
    .venv/bin/python bench/compiled.py --threads 2        # wall time with both cores, on an idle machine
    .venv/bin/python bench/compiled.py --backend eager    # graph capture only: a quick check that it runs

Two engines on the same model: one eager (Engine's default), one with enforce_eager=False, whose background
compile is waited for (its time is printed) before timing. One request at a time, one task on merged weights,
greedy with exactly --tokens new tokens; the engines take turns within each repeat and each keeps its best.
Decode tokens/s counts the tokens after the first (the first comes from the prompt's prefill, eager in
both). With one thread the clock is the process's CPU time, which other processes on a shared machine change
far less than wall time; else wall time. Both engines' tokens must be equal.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import torch
from machine import clock, cpu_model, load_average

import lora
from lora.engine import Engine, SamplingParams

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--prompt-tokens", type=int, default=100)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is CPU time")
p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: capture only, no code generation)")
args = p.parse_args()
torch.set_num_threads(args.threads)
CLOCK, CPU = clock(args.threads)
UNIT = "tokens per CPU-second" if CPU else "tokens/s"


def main() -> None:
    tasks = lora.MultiTaskModel(args.model, device="cpu", dtype="float32")
    prompt = torch.randint(100, 10000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    compiled = Engine(tasks, max_num_seqs=4, max_model_len=1024, enforce_eager=False, compile_backend=args.backend)
    eager = Engine(tasks, max_num_seqs=4, max_model_len=1024)
    assert compiled.runner.compiled is not None
    if not compiled.runner.compiled.wait():
        sys.exit(f"compiling failed: {compiled.runner.compiled.error!r}")
    print(f"compiled in the background in {time.perf_counter() - start:.0f} s (wall)", file=sys.stderr)
    engines = {"eager": eager, "compiled": compiled}
    first = SamplingParams(max_tokens=1)
    every = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens)
    best = {name: float("inf") for name in engines}
    tokens = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            t0 = CLOCK()
            engine.generate([prompt], [None], first)  # the prefill alone, subtracted below
            t1 = CLOCK()
            tokens[name] = engine.generate([prompt], [None], every)[0].new_token_ids
            t2 = CLOCK()
            best[name] = min(best[name], (t2 - t1) - (t1 - t0))
    assert tokens["eager"] == tokens["compiled"], "the compiled engine's tokens differ from the eager engine's"
    print(f"# {args.model}, float32, {args.prompt_tokens}-token prompt, {args.tokens} greedy tokens, "
          f"{args.threads} thread(s), {cpu_model()}, load {load_average()}, torch {torch.__version__}, "
          f"backend {args.backend}; best of {args.repeats}, decode {UNIT}")
    for name in engines:
        print(f"{name:>9}: {(args.tokens - 1) / best[name]:.1f}")
    print(f"  ratio: {best['eager'] / best['compiled']:.2f}x")


if __name__ == "__main__":
    main()
