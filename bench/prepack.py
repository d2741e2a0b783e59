"""Decode step time with engine.packed (prepacked weights; one row split across threads) against PyTorch's linear.

    PYTHONPATH=. .venv/bin/python bench/prepack.py                 # SmolLM2-135M, float32, 1 thread (CPU time)
    PYTHONPATH=. .venv/bin/python bench/prepack.py --threads 2     # wall time with both cores, on an idle machine

For each batch size: that many 100-token random prompts on the base model, greedy, exactly --tokens tokens each;
once every prompt is computed, --steps decode steps are timed. Engines with prepack_weights on and off take turns
(--repeats times, each keeps its best), and their tokens must be equal. One sequence is not packed but split
across threads, so it needs --threads 2 or more (on one thread it runs PyTorch's linear too). With one thread the
clock is the process's CPU time, which other processes on a shared machine change far less than wall time; else
wall time.
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import torch
from machine import clock, cpu_model, load_average

import lora
from lora.engine import Engine, SamplingParams

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
p.add_argument("--tokens", type=int, default=40)
p.add_argument("--steps", type=int, default=16)
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is CPU time")
args = p.parse_args()
torch.set_num_threads(args.threads)
CLOCK, CPU = clock(args.threads)
UNIT = f"{CPU}ms"


def decode_steps(tasks: lora.MultiTaskModel, batch: int, prepack: bool) -> tuple[float, list[list[int]]]:
    """The time of one decode step of `batch` sequences, and every sequence's tokens."""
    engine = Engine(tasks, max_num_seqs=batch, max_model_len=100 + args.tokens, prepack_weights=prepack)
    tokens: dict[str, list[int]] = {}
    sampling = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens)
    for i in range(batch):
        prompt = torch.randint(100, 10000, (100,), generator=torch.Generator().manual_seed(i)).tolist()
        engine.add_request(prompt, None, sampling, lambda out: tokens.setdefault(out.request_id, []).extend(
            out.new_token_ids))
    while engine.stats()["generation_tokens_total"] < batch:  # every prompt computed, the packing done
        engine.step()
    engine.step()
    start = CLOCK()
    for _ in range(args.steps):
        engine.step()
    took = (CLOCK() - start) / args.steps
    while engine.step():
        pass
    return took, list(tokens.values())


def main() -> None:
    tasks = lora.MultiTaskModel(args.model, device="cpu", dtype="float32")
    print(f"# {args.model}, float32, base weights, 100-token prompts, {args.threads} thread(s), {cpu_model()}, "
          f"load {load_average()}, torch {torch.__version__}; one decode step, best of {args.repeats}, {UNIT}")
    print("| sequences | linear | packed (1: split) | speed-up |\n|---:|---:|---:|---:|")
    for batch in args.batch:
        best = {True: float("inf"), False: float("inf")}
        answers = {}
        for _ in range(args.repeats):
            for prepack in (False, True):
                took, answers[prepack] = decode_steps(tasks, batch, prepack)
                best[prepack] = min(best[prepack], took)
        assert answers[True] == answers[False], f"prepacked tokens differ at batch {batch}"
        print(f"| {batch} | {best[False] * 1000:.1f} | {best[True] * 1000:.1f} | {best[False] / best[True]:.2f}x |")


if __name__ == "__main__":
    main()
