"""Constrained decoding, measured: the grammar mask's cost per step at batch 16 vs the decode step it rides on.

    .venv/bin/python bench/structured.py                 # SmolLM2-135M, float32, batch 16, 64 steps, 2 threads
    .venv/bin/python bench/structured.py --steps 4       # a quick check that it runs

Each step decodes one token for 16 requests that all write extraction's schema (examples/extraction/schema.json),
with the model's KV cache; the mask (16 llguidance fills, unpacking, masked_fill on the float32 logits) and the
matchers' advance are timed apart from the forward, step by step. A request whose answer is complete starts a
new one, so all 16 rows stay constrained. Also printed: binding the tokenizer (once per tokenizer) and compiling
the schema (once per schema, cached). The issue's goal: the mask costs at most 5% of the decode step.
"""
import argparse
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
from lora.structured import apply_masks, guide, request_constraint

EXTRACTION = Path(__file__).resolve().parent.parent / "examples" / "extraction"

p = argparse.ArgumentParser(description="Grammar mask cost per decode step, on the default model.")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
p.add_argument("--batch", type=int, default=16)
p.add_argument("--steps", type=int, default=64, help="timed decode steps")
p.add_argument("--threads", type=int, default=2, help="torch threads (1 when other jobs share the cores)")
p.add_argument("--temperature", type=float, default=1.0)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

model, tokenizer = lora.load_model(args.model, dtype=args.dtype, device="cpu")
model.eval()
schema = json.loads((EXTRACTION / "schema.json").read_text())
started = time.perf_counter()
bound = guide(tokenizer)
bind_s = time.perf_counter() - started
constraint = request_constraint({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
started = time.perf_counter()
grammar = bound.compile(constraint)
compile_ms = (time.perf_counter() - started) * 1e3
started = time.perf_counter()
assert bound.compile(constraint) is grammar
cached_us = (time.perf_counter() - started) * 1e6

request = json.loads((EXTRACTION / "test.json").read_text())[0]["instruction"]
prompt = (EXTRACTION / "prompt_format.txt").read_text().format(instruction=request, input="")
ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
matchers = [grammar.matcher() for _ in range(args.batch)]
forward_ms, mask_ms, advance_ms, answers = [], [], [], 0
with torch.no_grad():
    out = model(input_ids=torch.tensor([ids] * args.batch), use_cache=True)
    for _ in range(args.steps):
        logits = out.logits[:, -1].float()
        t0 = time.perf_counter()
        apply_masks(logits, matchers)
        t1 = time.perf_counter()
        if args.temperature:
            tokens = torch.multinomial((logits / args.temperature).softmax(-1), 1)[:, 0]
        else:
            tokens = logits.argmax(-1)
        t2 = time.perf_counter()
        for i, token in enumerate(tokens.tolist()):
            if matchers[i].is_accepting() and token == tokenizer.eos_token_id:
                matchers[i], answers = grammar.matcher(), answers + 1
                continue
            matchers[i].advance(token)
            if matchers[i].is_finished():
                matchers[i], answers = grammar.matcher(), answers + 1
        t3 = time.perf_counter()
        out = model(input_ids=tokens[:, None], cache=out.cache, use_cache=True)
        t4 = time.perf_counter()
        mask_ms.append((t1 - t0) * 1e3)
        advance_ms.append((t3 - t2) * 1e3)
        forward_ms.append((t4 - t3) * 1e3)

forward, mask, advance = (statistics.median(x) for x in (forward_ms, mask_ms, advance_ms))
print(f"| {args.model} {args.dtype}, batch {args.batch}, {args.steps} steps | median ms per step |")
print("|---|---|")
print(f"| decode forward (batch {args.batch}) | {forward:.2f} |")
print(f"| mask: {args.batch} fills + apply | {mask:.3f} ({1e3 * mask / args.batch:.0f} us per token) |")
print(f"| matchers' advance | {advance:.3f} |")
print(f"| mask + advance / decode step | {100 * (mask + advance) / forward:.2f}% (goal: at most 5%) |")
print(f"\nbind tokenizer: {bind_s:.2f} s once; compile schema: {compile_ms:.1f} ms once, then {cached_us:.0f} us "
      f"(cached); {answers} complete answers")
print(f"machine: {cpu_model()}, {args.threads} torch threads, load average {load_average()}", file=sys.stderr)
