"""Mixed-task batching, measured: merged-only, mixed-only and adaptive batches vs PEFT's mixed batches.

    .venv/bin/python bench/batching.py                  # SmolLM2-135M, 8 adapters, a few minutes on 2 idle cores
    .venv/bin/python bench/batching.py --threads 1      # on a busy shared machine (2 threads then wait on each other)
    .venv/bin/python bench/batching.py --requests 32 --max-new-tokens 8    # quicker

Two workloads with the same number of requests: skewed (90% for one task, the rest spread over the others)
and uniform (every task equally often). Each policy answers the same requests, greedy, with exactly
--max-new-tokens new tokens each (min_new_tokens), so tokens/s compare like for like:
  merged-only  MultiTaskModel.generate_responses(mode="merged"): one task per batch, weights merged
  mixed-only   mode="mixed": any tasks per batch, unmerged per-row updates (vLLM / S-LoRA / LoRAX style)
  adaptive     mode="auto": merged batches for a task that fills them, mixed for the rest
  PEFT mixed   PeftModel.generate(adapter_names=[...]) on the very batches mixed-only runs
Every policy runs its batches (plan_batches, then MultiTaskModel.run_batch: what generate_responses does)
--repeats times, the policies taking turns batch by batch, and each batch counts with its best time, so
load from other processes on a shared machine mostly drops out. Prints a markdown table.
The adapters are random (seeded) q_proj/v_proj r=8 adapters, large enough to change the answers.
"""
import argparse
import os
import platform
import random
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model and adapters are local

import torch

import lora
from lora.multitask import plan_batches

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--tasks", type=int, default=8)
p.add_argument("--requests", type=int, default=48, help="requests per workload")
p.add_argument("--skew", type=float, default=0.9, help="share of the skewed workload that goes to one task")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--max-new-tokens", type=int, default=16)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

try:
    import peft
    from peft import PeftModel
except ImportError:
    sys.exit("bench/batching.py compares against PEFT: pip install peft (or make install, which installs the dev extras)")
import transformers

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls deprecated transformers APIs
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
t_start = time.perf_counter()
PROMPT_FORMAT = "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n"
INSTRUCTIONS = ["Summarize the text in one sentence.", "Translate the text to French.", "List three facts from the text.",
                "What is the main topic of the text?", "Write a headline for the text.", "Answer briefly: who is named?"]
TEXTS = ["The city council approved a new bike lane on Main Street after a long public debate.",
         "A small bakery in Lyon won a national award for its sourdough bread this spring.",
         "Researchers found that the river's fish population doubled within five years of the dam removal.",
         "The museum will open a new wing dedicated to early photography next month.",
         "Heavy rain delayed the harvest, but farmers expect a good grape yield overall.",
         "The team released version two of its open-source map software with offline support."]


def make_adapters(folder):
    """--tasks random adapters shaped like trained ones: q_proj/v_proj, r=8, B nonzero so answers change."""
    model, _ = lora.load_model(args.model)
    lora.inject(model, ["q_proj", "v_proj"], r=8, alpha=16)
    paths = {}
    for t in range(args.tasks):
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                torch.nn.init.kaiming_uniform_(layer.lora_A, a=5 ** 0.5)
                layer.lora_B.normal_(0, 0.02)
        paths[f"task{t}"] = lora.save_adapter(model, os.path.join(folder, f"task{t}"), args.model,
                                              task={"prompt_format": PROMPT_FORMAT})
    return paths


def workload(tasks, rng):
    """Requests in arrival order; the same prompts in both workloads, only their tasks differ."""
    prompts = [(INSTRUCTIONS[i % len(INSTRUCTIONS)], TEXTS[(i // len(INSTRUCTIONS) + i) % len(TEXTS)])
               for i in range(args.requests)]
    rng.shuffle(tasks)
    return [{"downstream": task, "instruction": instruction, "input": text}
            for task, (instruction, text) in zip(tasks, prompts)]


def ours(mt, requests, batch, mixed):
    """One batch as MultiTaskModel.generate_responses runs it: merged weights, or unmerged mixed rows."""
    return mt.run_batch([mt.prompt_for(requests[i]) for i in batch], [requests[i]["downstream"] for i in batch],
                        mixed, **GENERATION)


def peft_mixed(peft_model, mt, requests, batch, mixed):
    """PEFT's mixed-adapter batch, left-padded and decoded as ours are."""
    ids = [lora.data.encode_prompt(mt.tokenizer, mt.prompt_for(requests[i])) for i in batch]
    width, pad = max(map(len, ids)), lora.data.pad_token_id(mt.tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        out = peft_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  adapter_names=[requests[i]["downstream"] for i in batch],
                                  **mt.generation_kwargs(GENERATION))
    return [mt.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


GENERATION = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens}
POLICIES = {"merged-only": "merged", "mixed-only": "mixed", "adaptive": "auto", "PEFT mixed": "mixed"}  # -> plan mode

with tempfile.TemporaryDirectory() as folder:
    paths = make_adapters(folder)
    names = list(paths)
    mt = lora.MultiTaskModel(args.model, paths, device="cpu")
    base, _ = lora.load_model(args.model)
    peft_model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()

    rng = random.Random(args.seed)
    n_main = round(args.skew * args.requests)
    workloads = {
        f"skewed ({args.skew:.0%} one task)": workload(
            [names[0]] * n_main + [names[1 + i % (len(names) - 1)] for i in range(args.requests - n_main)], rng),
        f"uniform ({len(names)} tasks)": workload([names[i % len(names)] for i in range(args.requests)], rng),
    }
    runners = {"merged-only": ours, "mixed-only": ours, "adaptive": ours,
               "PEFT mixed": lambda *batch: peft_mixed(peft_model, *batch)}
    ours(mt, list(workloads.values())[0], [0, 1], True)  # warm-up: first-call costs, caches
    rows = []
    for label, requests in workloads.items():
        plans = {policy: plan_batches([r["downstream"] for r in requests], args.batch_size, mode)
                 for policy, mode in POLICIES.items()}
        best = {policy: [float("inf")] * len(plan) for policy, plan in plans.items()}
        answers = {policy: [None] * len(requests) for policy in POLICIES}
        # The policies take turns batch by batch, each at the same pace through its plan, so load from
        # other processes hits every policy alike; then each batch counts with its best time.
        schedule = sorted(((k + 0.5) / len(plan), policy, k) for policy, plan in plans.items() for k in range(len(plan)))
        for repeat in range(args.repeats):
            for _, policy, k in schedule:
                mixed, batch = plans[policy][k]
                started = time.perf_counter()
                texts = runners[policy](mt, requests, batch, mixed)
                best[policy][k] = min(best[policy][k], time.perf_counter() - started)
                for i, text in zip(batch, texts):
                    answers[policy][i] = text
            print(f"  {label}, run {repeat + 1}: " + ", ".join(f"{policy} {sum(best[policy]):.1f} s" for policy in POLICIES),
                  file=sys.stderr, flush=True)
        tokens = len(requests) * args.max_new_tokens
        tps = {policy: tokens / sum(seconds) for policy, seconds in best.items()}
        same = {policy: sum(a == b for a, b in zip(answers[policy], answers["merged-only"])) for policy in POLICIES}
        rows.append((label, tps, same, plans["adaptive"], len(requests)))

print(f"\n{args.requests} requests per workload, {args.tasks} adapters (q_proj, v_proj, r=8), batch size "
      f"{args.batch_size}, {args.max_new_tokens} new tokens each, greedy; each batch's best of {args.repeats} runs; "
      "tokens/s:\n")
print("| workload | merged-only | mixed-only | adaptive | PEFT mixed | adaptive / best fixed | mixed-only / PEFT |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, tps, _, _, _ in rows:
    best_fixed = max(tps["merged-only"], tps["mixed-only"])
    print(f"| {label} | {tps['merged-only']:.1f} | {tps['mixed-only']:.1f} | {tps['adaptive']:.1f} | "
          f"{tps['PEFT mixed']:.1f} | {tps['adaptive'] / best_fixed:.2f} | {tps['mixed-only'] / tps['PEFT mixed']:.2f} |")
print()
for label, _, same, plan, n in rows:
    merged = sum(not mixed for mixed, _ in plan)
    print(f"- {label}: adaptive ran {merged} merged + {len(plan) - merged} mixed batches; answers equal to "
          f"merged-only: " + ", ".join(f"{policy} {same[policy]}/{n}" for policy in same if policy != "merged-only"))
print(f"\nMachine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
      f"{args.threads} torch threads; torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}. Whole run: {time.perf_counter() - t_start:.0f} s.")
