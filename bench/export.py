"""llama.cpp running an exported adapter vs this engine on merged weights: the same greedy tokens, and each speed.

    PYTHONPATH=. .venv/bin/python bench/export.py                      # demo adapters if trained, else random ones
    PYTHONPATH=. /work/llama-venv/bin/python bench/export.py --tokens 32 --prompts 4
    PYTHONPATH=. /work/llama-venv/bin/python bench/export.py --score     # and each task's test-set score

For each task: `lora export --format gguf-adapter`, then llama.cpp (llama-cpp-python, built from source) loads
SmolLM2's packaged GGUF rewritten with every tensor in F32 (the very weights `lora.load_model` dequantizes)
with the adapter, and greedily decodes the task's first test prompts, rendered as training rendered them,
ignoring end-of-sequence; this engine decodes the same prompt ids with the task merged (mode "merged").
Prints, per task, how many answers agree token for token and how far they agree, and both speeds (one request
at a time, the same thread count): tokens/s after the first token, and the time to it. Needs llama-cpp-python
(see bench/README.md).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf
import torch

import lora
from bench.machine import cpu_model, load_average
from lora.data import load_records
from lora.engine import Engine, SamplingParams
from lora.engine.output import eos_ids
from lora.evaluate import METRICS, evaluate
from lora.export.gguf_merged import dequantized, rewrite_gguf
from lora.models import smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TASKS = ("question_answering", "summarization", "extraction")
DEMO_RUNS = [os.path.join(ROOT, "runs", "demo"), "/work/main/runs/demo"]


def adapters(work):
    """{task: checkpoint}: the demo's trained adapters if there are, else seeded random all-linear ones."""
    for runs in DEMO_RUNS:
        found = {t: os.path.join(runs, t, "final") for t in DEMO_TASKS}
        if all(os.path.isdir(p) for p in found.values()):
            return found, f"the demo's trained adapters ({runs})"
    from bench.make_adapters import make_adapters

    made = make_adapters(os.path.join(work, "random"), tasks=len(DEMO_TASKS), r=8, alpha=16, std=0.02)
    return dict(zip(DEMO_TASKS, made.values())), "seeded random all-linear r=8 adapters (bench/make_adapters.py)"


def f32_base(path):
    """The packaged GGUF with every tensor dequantized to F32: the weights the engine runs on, for llama.cpp."""
    if not os.path.exists(path):
        rewrite_gguf(gguf.GGUFReader(smollm2_gguf()), path, dequantized, "f32")
    return path


@dataclass
class Timing:
    """Where decoding time went, over all prompts: prompt processing up to the first token, then each next token."""
    first_token_seconds: float = 0.0
    next_tokens: int = 0
    next_token_seconds: float = 0.0

    def add(self, started, stamps):
        self.first_token_seconds += stamps[0] - started
        self.next_tokens += len(stamps) - 1
        self.next_token_seconds += stamps[-1] - stamps[0]

    @property
    def tokens_per_s(self):
        return self.next_tokens / self.next_token_seconds


def llama_cpp_tokens(base, adapter_gguf, prompts, n, threads):
    """Greedy ids of llama.cpp with the adapter for each prompt (EOS ignored), and their Timing."""
    from llama_cpp import Llama

    llm = Llama(model_path=base, lora_path=adapter_gguf, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    answers, timing = [], Timing()
    for ids in prompts:
        started, stamps, out = time.perf_counter(), [], []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(int(token))
            if len(out) == n:
                break
        timing.add(started, stamps)
        answers.append(out)
    del llm
    return answers, timing


def engine_tokens(mt, task, prompts, n):
    """The engine's greedy ids on the task's merged weights, one request at a time, and their Timing."""
    engine = Engine(mt, max_num_seqs=1, mode="merged")
    answers, timing = [], Timing()
    for ids in prompts:
        started, stamps, tokens, done = time.perf_counter(), [], [], []

        def on_output(out, stamps=stamps, tokens=tokens, done=done):
            stamps.append(time.perf_counter())
            new = getattr(out, "new_token_ids", None)  # the engine contract's per-step ids; older: all ids so far
            tokens[:] = tokens + list(new) if new is not None else list(out.token_ids)
            if out.finished:
                done.append(out)
        engine.add_request(ids, task, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), on_output)
        while not done:
            engine.step()
        timing.add(started, stamps)
        answers.append(tokens[:n])
    return answers, timing


def llama_cpp_answers(base, adapter_gguf, prompts, budget, eos, threads):
    """llama.cpp's greedy answers with the adapter, each ending at an end-of-sequence token or after `budget`."""
    from llama_cpp import Llama

    llm = Llama(model_path=base, lora_path=adapter_gguf, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    answers = []
    for ids in prompts:
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if int(token) in eos or len(out) == budget:
                break
            out.append(int(token))
        answers.append(out)
    del llm
    return answers


def scores(mt, task, base, adapter_gguf, threads):
    """The task's test-set score through this engine (its free answers) and through llama.cpp, as `lora eval`
    scores them; returns (metric, engine score, llama.cpp score, test examples)."""
    records = load_records(os.path.join(ROOT, "examples", task, "test.json"))
    metric = "rouge_l" if task == "summarization" else "exact_match"
    ours = evaluate(mt, task, records, metric, constrained=False)
    prompts = [mt.prompt_ids({"downstream": task, "instruction": r["instruction"], "input": r["input"]})
               for r in records]
    eos = set(eos_ids(mt.pretrained_model, mt.tokenizer))
    theirs = llama_cpp_answers(base, adapter_gguf, prompts, ours["max_new_tokens"], eos, threads)
    texts = [mt.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in theirs]
    theirs_score = sum(METRICS[metric](t, r["output"]) for t, r in zip(texts, records)) / len(records)
    return metric, ours["score"], theirs_score, len(records)


def agreement(a, b):
    """How many leading tokens two answers share."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer (agreement is checked on all)")
    p.add_argument("--prompts", type=int, default=4, help="test prompts per task")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lora-bench-export"))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--score", action="store_true",
                   help="also score each task's whole test set through llama.cpp and through the engine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    tasks, source = adapters(args.work)
    base = f32_base(os.path.join(args.work, "smollm2-135m-f32.gguf"))
    mt = lora.MultiTaskModel("smollm2-135m", tasks, device="cpu", dtype="float32")
    print(f"{cpu_model()}, {args.threads} threads, load {load_average()}; adapters: {source}")
    results = []
    for task, path in tasks.items():
        adapter_gguf = lora.export_gguf_adapter(mt.pretrained_model, path, os.path.join(args.work, f"{task}.gguf"))
        records = load_records(os.path.join(ROOT, "examples", task, "test.json"))[: args.prompts]
        prompts = [mt.prompt_ids({"downstream": task, "instruction": r["instruction"], "input": r["input"]})
                   for r in records]
        ours, our_time = engine_tokens(mt, task, prompts, args.tokens)
        theirs, their_time = llama_cpp_tokens(base, adapter_gguf, prompts, args.tokens, args.threads)
        same = [agreement(a, b) for a, b in zip(ours, theirs)]
        row = {"task": task, "prompts": len(prompts), "tokens": args.tokens,
               "identical": sum(s == args.tokens for s in same), "min_agreeing_tokens": min(same),
               "engine": {"tokens_per_s": our_time.tokens_per_s, "prompt_seconds": our_time.first_token_seconds},
               "llama_cpp": {"tokens_per_s": their_time.tokens_per_s, "prompt_seconds": their_time.first_token_seconds},
               "adapter_gguf_bytes": os.path.getsize(adapter_gguf),
               "first_answer": {"engine": mt.tokenizer.decode(ours[0]), "llama_cpp": mt.tokenizer.decode(theirs[0])}}
        if args.score:
            metric, ours_score, theirs_score, n = scores(mt, task, base, adapter_gguf, args.threads)
            row["score"] = {"metric": metric, "engine": ours_score, "llama_cpp": theirs_score, "examples": n}
            print(f"{task:<20} {metric} on {n} test examples: engine {ours_score:.3f}, llama.cpp {theirs_score:.3f}")
        results.append(row)
        print(f"{task:<20} {row['identical']}/{row['prompts']} answers identical over {args.tokens} tokens "
              f"(shortest agreement {row['min_agreeing_tokens']}); decode: engine {our_time.tokens_per_s:.1f} tok/s, "
              f"llama.cpp {their_time.tokens_per_s:.1f} tok/s; prompts to first token: engine "
              f"{our_time.first_token_seconds:.2f} s, llama.cpp {their_time.first_token_seconds:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "adapters": source, "results": results}, f,
                      indent=2)
    return 0 if all(r["min_agreeing_tokens"] >= min(24, args.tokens) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
