"""Constrained decoding through the engine: the step time of 16 requests writing a schema vs 16 free ones.

    .venv/bin/python bench/structured_engine.py               # SmolLM2-135M, float32, batch 16, 48 steps, 2 threads
    .venv/bin/python bench/structured_engine.py --steps 4     # a quick check that it runs

Both runs keep `--batch` requests decoding (a finished one is replaced at once) on the extraction prompt, and
step in turn; the constrained run's requests follow extraction's schema (examples/extraction/schema.json), so each of its steps
also builds the masks on the host, masks the rows and advances the matchers. Prefill steps are not counted.
The difference of the median decode step times is what constraining costs per step (the goal: at most 5%);
on a machine whose cores are shared that difference is mostly noise, so the time spent in the constrained
steps' own work (building and applying the masks, advancing the matchers) is also timed directly.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import torch
from machine import cpu_model, load_average  # bench/machine.py: this script's folder is on sys.path

import lora
import lora.engine.runner
from lora.engine import Engine, SamplingParams
from lora.structured import Matcher

EXTRACTION = Path(__file__).resolve().parent.parent / "examples" / "extraction"

p = argparse.ArgumentParser(description="Engine decode step with and without a schema, on the default model.")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
p.add_argument("--device", default="cpu")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--steps", type=int, default=48, help="timed decode steps per run")
p.add_argument("--threads", type=int, default=2, help="torch threads (1 when other jobs share the cores)")
args = p.parse_args()
torch.set_num_threads(args.threads)

mt = lora.MultiTaskModel(args.model, device=args.device, dtype=args.dtype)
schema = json.loads((EXTRACTION / "schema.json").read_text())
grammar = mt.grammar({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
record = json.loads((EXTRACTION / "test.json").read_text())[0]
prompt = (EXTRACTION / "prompt_format.txt").read_text().format(instruction=record["instruction"], input="")
ids = mt.tokenizer(prompt, add_special_tokens=False)["input_ids"]


grammar_ms = [0.0]  # time in the grammar's work, summed over every step of the constrained run


def timed(fn):
    def wrapper(*a, **k):
        started = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            grammar_ms[0] += (time.perf_counter() - started) * 1e3
    return wrapper


lora.engine.runner.apply_masks = timed(lora.engine.runner.apply_masks)
Matcher.advance, Matcher.is_finished = timed(Matcher.advance), timed(Matcher.is_finished)


class Run:
    """An engine that keeps `args.batch` requests of one kind decoding: a finished one is replaced at once."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.engine = Engine(mt, max_num_seqs=args.batch, max_model_len=len(ids) + 256)
        self.sampling, self.seeds, self.times, self.grammar = sampling, iter(range(1 << 30)), [], []
        for _ in range(args.batch):
            self.add()

    def add(self) -> None:
        sampling = dataclasses.replace(self.sampling, seed=next(self.seeds))
        self.engine.add_request(ids, None, sampling, lambda out: self.add() if out.finished else None)

    def step(self) -> None:
        """One step, timed when it only decodes (a step that prefills a new request is not counted)."""
        scheduler = self.engine.scheduler
        prefilling = bool(scheduler.waiting) or any(not r.decoding for r in scheduler.running)
        if args.device != "cpu":
            torch.cuda.synchronize()
        grammar_before, started = grammar_ms[0], time.perf_counter()
        self.engine.step()
        if not prefilling:
            self.times.append((time.perf_counter() - started) * 1e3)
            self.grammar.append(grammar_ms[0] - grammar_before)


# The two runs step in turn, so a change in the machine's load (shared cores) reaches both alike.
runs = [Run(SamplingParams(max_tokens=64, min_tokens=64, temperature=1.0)),
        Run(SamplingParams(max_tokens=64, temperature=1.0, grammar=grammar))]
while min(len(run.times) for run in runs) < args.steps:
    for run in runs:
        run.step()
free, constrained = (run.times for run in runs)
own = statistics.median(a / b for a, b in zip(runs[1].grammar, runs[1].times))
f, c = statistics.median(free), statistics.median(constrained)
print(f"| {args.model} {args.dtype} on {args.device}, batch {args.batch}, {args.steps} decode steps | median ms per step |")
print("|---|---|")
print(f"| free | {f:.2f} |")
print(f"| constrained (extraction's schema) | {c:.2f} |")
print(f"| constrained - free | {c - f:+.2f} ({100 * (c - f) / f:+.1f}%) |")
print(f"| masks + matchers, share of a constrained step | {statistics.median(runs[1].grammar):.2f} "
      f"({100 * own:.1f}%; goal: at most 5%) |")
print(f"machine: {cpu_model()}, {args.threads} torch threads, load average {load_average()}", file=sys.stderr)
