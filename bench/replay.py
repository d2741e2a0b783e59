"""bench/serve.py's trace replayed straight into an Engine (no HTTP): closed-loop clients, timed on one thread in CPU time.

    PYTHONPATH=. .venv/bin/python bench/replay.py --shared-prefix 300 --requests 32 --max-tokens 32 --output-sigma 0
    PYTHONPATH=/tmp/old-checkout .venv/bin/python bench/replay.py ...    # the same trace on another checkout's engine

The trace flags are bench/serve.py's (same seeded prompts, lengths and tasks); --concurrency clients each send
their next request as soon as the last one finished. Every run starts on a fresh engine (the prefix cache cold),
after one short request per task (serve.py's warm-up). With one thread (the default) the clock is the process's
CPU time, which other processes on a shared machine change far less than wall time: use it to compare two
checkouts on a loaded machine; serve.py against the servers themselves on an idle one. Prints one line per mix:
tokens per second, steps, prompt tokens computed, prefix-cache hits, and time to first token and latency
percentiles (in the clock's seconds, counted from when a client sent the request).
"""
import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local

import serve
import torch
from machine import clock, cpu_model, load_average

import lora
from lora.engine import Engine, SamplingParams


def replay(mt: lora.MultiTaskModel, trace: list, concurrency: int, now) -> dict:
    """Run `trace` through a fresh engine with `concurrency` closed-loop clients; its numbers."""
    engine = Engine(mt)
    for task in sorted({r.task for r in trace}):  # serve.py's warm-up
        engine.generate([mt.tokenizer("Warm up.")["input_ids"]], [task], SamplingParams(max_tokens=4))
    prompts = [mt.tokenizer(r.prompt)["input_ids"] for r in trace]
    sent, first, done = {}, {}, {}

    def on_output(out):
        first.setdefault(out.request_id, now())
        if out.finished:
            done[out.request_id] = now()
            if out.error is not None:
                sys.exit(f"request {out.request_id} failed: {out.error}")

    def send(i):
        planned = trace[i].max_tokens
        sampling = SamplingParams(max_tokens=planned, min_tokens=planned, ignore_eos=True)
        sent[engine.add_request(prompts[i], trace[i].task, sampling, on_output)] = now()

    before, start = engine.stats(), now()
    for i in range(min(concurrency, len(trace))):
        send(i)
    while len(done) < len(trace):
        engine.step()
        while len(sent) < len(trace) and len(sent) - len(done) < concurrency:
            send(len(sent))
    wall, after = now() - start, engine.stats()
    ttft, latency = ([first[i] - sent[i] for i in sent], [done[i] - sent[i] for i in sent])
    return {"tokens/s": sum(r.max_tokens for r in trace) / wall, "seconds": wall,
            **{k: after[k] - before[k] for k in ("steps_total", "prompt_tokens_total", "prefix_cache_hits")},
            "ttft p50": statistics.median(ttft), "ttft p95": percentile(ttft, 95),
            "latency p50": statistics.median(latency), "latency p95": percentile(latency, 95)}


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", default="/tmp/bench-adapters", help="bench/make_adapters.py's folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 the clock is CPU time")
    ours, rest = p.parse_known_args()
    args = serve.parse_args(["--base-url", "engine=in-process", *rest])  # the trace flags, as serve.py reads them
    torch.set_num_threads(ours.threads)
    now, unit = clock(ours.threads)
    mapper = {task: os.path.join(ours.adapters, task) for task in args.tasks}
    mt = lora.MultiTaskModel(ours.model, mapper, device="cpu", dtype="float32")
    print(f"# {ours.model} float32, engine from {os.path.dirname(os.path.dirname(lora.__file__))}, "
          f"{ours.threads} thread(s), {cpu_model()}, load {load_average()}; {unit}seconds")
    for mix, trace in serve.make_trace(args, args.tasks).items():
        numbers = replay(mt, trace, args.concurrency or 8, now)
        print(f"{mix}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()),
              flush=True)


if __name__ == "__main__":
    main()
