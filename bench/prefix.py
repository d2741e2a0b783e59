"""Time to first token of a request whose first tokens are in the prefix cache, against the same request uncached.

    PYTHONPATH=. .venv/bin/python bench/prefix.py                  # SmolLM2-135M, float32, 1 thread (CPU time), 500 + 16 tokens
    PYTHONPATH=. .venv/bin/python bench/prefix.py --threads 2      # wall time with both cores, on an idle machine

One engine, one task (a seeded random adapter, bench/make_adapters.py, written to a temporary folder), merged
weights. A shared --prefix-tokens prefix is computed once; then, interleaved --repeats times, a request of the
shared prefix plus a fresh --suffix-tokens suffix (cached: only the suffix and the last partial block are
computed) and a request of a fresh prefix of the same length plus a fresh suffix (uncached). Each asks for one
token, so its time is its time to first token (prefill and the first sample; nothing else is queued). Medians.
With one thread the clock is the process's CPU time, which other processes on a shared machine change far less
than wall time; else wall time. Before timing, a cached answer must equal the same prompt's answer from an
engine without prefix caching (16 greedy tokens).
"""
import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import torch
from machine import clock, cpu_model, load_average
from make_adapters import make_adapters

import lora
from lora.engine import Engine, SamplingParams

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--prefix-tokens", type=int, default=500)
p.add_argument("--suffix-tokens", type=int, default=16)
p.add_argument("--repeats", type=int, default=7)
p.add_argument("--block-size", type=int, default=16)
p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is CPU time")
args = p.parse_args()
torch.set_num_threads(args.threads)
CLOCK, CPU = clock(args.threads)
UNIT = f"{CPU}seconds"
generator = torch.Generator().manual_seed(0)


def tokens(n: int) -> list[int]:
    return torch.randint(100, 10000, (n,), generator=generator).tolist()


def answer(engine: Engine, prompt: list[int], sampling: SamplingParams) -> list[int]:
    output = engine.generate([prompt], ["task0"], sampling)[0]
    if output.error is not None:
        sys.exit(f"the request failed: {output.error}")
    return output.new_token_ids


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as folder:  # adapters load when first used
        run(folder)


def run(folder: str) -> None:
    tasks = lora.MultiTaskModel(args.model, make_adapters(folder, args.model, tasks=1), device="cpu", dtype="float32")
    length = args.prefix_tokens + args.suffix_tokens + 16
    engine = Engine(tasks, max_num_seqs=2, max_model_len=length, block_size=args.block_size)
    plain = Engine(tasks, max_num_seqs=2, max_model_len=length, enable_prefix_caching=False)
    shared = tokens(args.prefix_tokens)
    check = shared + tokens(args.suffix_tokens)
    sixteen = SamplingParams(max_tokens=16, min_tokens=16)
    answer(engine, shared + tokens(args.suffix_tokens), sixteen)  # the shared prefix, cached
    hits = engine.stats()["prefix_cache_hits"]
    cached_answer = answer(engine, check, sixteen)
    assert engine.stats()["prefix_cache_hits"] > hits, "the shared prefix was not found in the cache"
    assert cached_answer == answer(plain, check, sixteen), \
        "a cached answer differs from the same prompt computed whole"
    first = SamplingParams(max_tokens=1)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.repeats):
        for name, prefix in (("uncached", tokens(args.prefix_tokens)), ("cached", shared)):
            before = engine.stats()["prefix_cache_hits"]
            start = CLOCK()
            answer(engine, prefix + tokens(args.suffix_tokens), first)
            times[name].append(CLOCK() - start)
            hit = engine.stats()["prefix_cache_hits"] - before
            assert (hit > 0) == (name == "cached"), f"an {name} request found {hit} tokens in the cache"
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"# {args.model}, float32, one task's adapter (merged), {args.prefix_tokens}-token shared prefix + "
          f"{args.suffix_tokens}-token suffix, block size {args.block_size}, {args.threads} thread(s), "
          f"{cpu_model()}, load {load_average()}, torch {torch.__version__}; time to first token, median of "
          f"{args.repeats} interleaved, {UNIT}", file=sys.stderr)
    for name, value in median.items():
        print(f"{name:>9}: {value * 1000:.0f} ms")
    print(f"    ratio: {median['cached'] / median['uncached']:.3f}x (cached / uncached)")


if __name__ == "__main__":
    main()
