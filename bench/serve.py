"""Serving under load, measured: one fixed, seeded trace replayed against any OpenAI-compatible servers.

    python bench/serve.py --base-url ours=http://127.0.0.1:8000/v1 --models task0,task1,task2
    python bench/serve.py --base-url ours=http://127.0.0.1:8000/v1 vllm=http://127.0.0.1:8001/v1 \\
        --models task0,task1,task2 --requests 48 --concurrency 8 --max-tokens 32 --output-sigma 0

The trace: --requests completions requests, each a prompt of English words (lognormal length, median
--prompt-words, capped) for one of --models, asking for a planned number of tokens (lognormal, median
--max-tokens/2, capped at --max-tokens; --output-sigma 0: exactly --max-tokens). Two mixes share every prompt
and length and differ only in the tasks: uniform (every task equally often) and skewed (90% on the first task).
The shared-prefix trace (--shared-prefix WORDS): each task's own system prompt of that many seeded words goes in
front of every prompt of the task, as a task's prompt format or system prompt does (what prefix caching reuses).
Clients: --concurrency closed-loop clients, each sending its next request when the last one is answered; or
Poisson arrivals at --rate requests/s (then --concurrency, if given, caps the requests in flight).
Every request is greedy and streamed (so time to first token is seen) and sends max_tokens plus vLLM's
min_tokens and ignore_eos, so a server that honours them generates exactly the planned length; the table
shows the tokens actually generated, from the usage the servers report.

With several --base-url, the traces run interleaved (A, B, A, B ... for --rounds rounds) so that load from
other processes hits all servers alike; ratios are medians of the per-round ratios. Afterwards each request
is sent again alone (--reference: to the same server, to one named server, or to another URL), and
"= alone" counts the trace answers equal to it: batching must not change a greedy answer.
The "short behind long" probe: the latency of a short request (8 tokens) sent while one long request
(300 tokens) is generating, over its latency alone.

Prints markdown tables (paste them into the README with the machine line). Needs only the openai client.

Adapters and model for a reproducible run, offline (bench/make_adapters.py writes both):
    PYTHONPATH=. .venv/bin/python bench/make_adapters.py /tmp/bench-adapters
    PYTHONPATH=. .venv/bin/python -m lora.cli serve --model smollm2-135m --mapper /tmp/bench-adapters --port 8000
"""
import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

from machine import cpu_model

try:
    import httpx
    import openai
except ImportError:
    sys.exit("bench/serve.py needs the openai client: pip install openai (the dev extra has it)")

WORDS = ("the of and to in is was for on that with as by at from his her this which or had not but are an they "
         "one were you all have there been their has would when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three house river garden music city water light "
         "story letter morning window market table summer mountain question answer teacher island road friend").split()
TASK_HINTS = ("Summarize the text.", "Continue the story.", "Rewrite the text formally.", "List the main points.",
              "Translate the text to French.", "Answer the question in the text.", "Give the text a title.",
              "Explain the text to a child.")
SHORT_TOKENS = 8  # the short-behind-long probe


@dataclass(frozen=True)
class Request:
    task: str
    prompt: str
    max_tokens: int


@dataclass
class Result:
    request: Request
    text: str = ""
    tokens: int = 0
    ttft: float = math.nan
    latency: float = math.nan
    error: str = ""


@dataclass
class Run:
    """One trace on one server."""
    server: str
    mix: str
    results: list = field(default_factory=list)
    wall: float = 0.0

    @property
    def ok(self):
        return [r for r in self.results if not r.error]

    @property
    def tokens_per_s(self):
        return sum(r.tokens for r in self.ok) / self.wall


def lognormal_ints(rng, n, median, sigma, low, high):
    return [min(high, max(low, round(median * math.exp(rng.gauss(0, sigma))))) for _ in range(n)]


def make_trace(args, tasks):
    """{mix: [Request]}: the same prompts and lengths in every mix, only the tasks differ."""
    rng = random.Random(args.seed)
    prompt_words = lognormal_ints(rng, args.requests, args.prompt_words, args.prompt_sigma, 4, args.prompt_max_words)
    outputs = ([args.max_tokens] * args.requests if args.output_sigma == 0 else
               lognormal_ints(rng, args.requests, args.max_tokens / 2, args.output_sigma, 1, args.max_tokens))
    prompts = [f"{rng.choice(TASK_HINTS)}\n\n{' '.join(rng.choices(WORDS, k=n)).capitalize()}.\n\n"
               for n in prompt_words]
    task_rng = random.Random(args.seed + 1)
    mixes = {"uniform": [task_rng.choice(tasks) for _ in prompts],
             "skewed": [tasks[0] if task_rng.random() < args.skew or len(tasks) == 1 else task_rng.choice(tasks[1:])
                        for _ in prompts]}
    system = {task: shared_prefix(args, task) for task in tasks}
    return {mix: [Request(task, system[task] + prompt, n) for task, prompt, n in zip(mixes[mix], prompts, outputs)]
            for mix in args.mix}


def shared_prefix(args, task):
    """The task's system prompt: --shared-prefix seeded words (its own per task) before every prompt of the task."""
    if not args.shared_prefix:
        return ""
    rng = random.Random(f"{args.seed}-{task}")
    return f"You are the {task} assistant. {' '.join(rng.choices(WORDS, k=args.shared_prefix)).capitalize()}.\n\n"


def arrival_times(args):
    if args.rate is None:
        return None
    rng = random.Random(args.seed + 2)
    t, times = 0.0, []
    for _ in range(args.requests):
        times.append(t)
        t += rng.expovariate(args.rate)
    return times


def client_for(url):
    # trust_env=False: a proxy from the environment must not sit between the benchmark and 127.0.0.1
    return openai.AsyncOpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), max_retries=0,
                              timeout=3600, http_client=httpx.AsyncClient(trust_env=False, timeout=3600,
                                                                          limits=httpx.Limits(max_connections=256)))


async def send(client, request, on_first_token=None):
    """One streamed, greedy completion; never raises (a failure is the result's error)."""
    result, start = Result(request), time.perf_counter()
    pieces = []
    try:
        stream = await client.completions.create(
            model=request.task, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": request.max_tokens, "ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if not pieces:
                    result.ttft = time.perf_counter() - start
                    if on_first_token:
                        on_first_token.set()
                pieces.append(chunk.choices[0].text)
            if chunk.usage:
                result.tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - counted and shown, the run goes on
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    result.text = "".join(pieces)
    if on_first_token:
        on_first_token.set()  # also when the request failed or streamed nothing
    return result


async def replay(client, requests, args, arrivals):
    """The trace, as --concurrency closed-loop clients or Poisson arrivals; results in trace order."""
    results = [None] * len(requests)
    if arrivals is None:
        order = iter(range(len(requests)))

        async def client_loop():
            for i in order:
                results[i] = await send(client, requests[i])
        await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
        return results
    slots = asyncio.Semaphore(args.concurrency or len(requests))
    start = time.perf_counter()

    async def arrive(i):
        await asyncio.sleep(arrivals[i] - (time.perf_counter() - start))
        async with slots:
            results[i] = await send(client, requests[i])
    await asyncio.gather(*(arrive(i) for i in range(len(requests))))
    return results


async def run_trace(name, client, mix, requests, args, arrivals):
    start = time.perf_counter()
    results = await replay(client, requests, args, arrivals)
    run = Run(name, mix, results, time.perf_counter() - start)
    errors = [r.error for r in results if r.error]
    log(f"{name} {mix}: {run.tokens_per_s:.1f} tokens/s in {run.wall:.1f} s"
        + (f", {len(errors)} errors (first: {errors[0]})" if errors else ""))
    return run


async def alone(client, requests):
    """Each distinct request on its own, one at a time: {request: Result}."""
    answers = {}
    for request in dict.fromkeys(requests):
        answers[request] = await send(client, request)
    return answers


async def short_behind_long(client, tasks, long_tokens, seed):
    """(short alone s, short behind long s, long tokens): the short request is sent once the long one streams."""
    rng = random.Random(seed + 3)
    short = Request(tasks[-1], f"Continue the story.\n\n{' '.join(rng.choices(WORDS, k=24)).capitalize()}.\n\n",
                    SHORT_TOKENS)
    long = Request(tasks[0], f"Continue the story.\n\n{' '.join(rng.choices(WORDS, k=24)).capitalize()}.\n\n",
                   long_tokens)
    solo = statistics.median([(await send(client, short)).latency for _ in range(3)])
    streaming = asyncio.Event()
    long_task = asyncio.create_task(send(client, long, on_first_token=streaming))
    await streaming.wait()
    behind = await send(client, short)
    long_result = await long_task
    for result in (behind, long_result):
        if result.error:
            raise RuntimeError(f"the short-behind-long probe failed: {result.error}")
    return solo, behind.latency, long_result.tokens


# ---------------------------------------------------------------- reporting

def log(msg):
    print(f"[serve {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def pct(values, q):
    """The q-th percentile, linearly interpolated (as numpy's default)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    k = (len(values) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return values[low] + (values[high] - values[low]) * (k - low)


def machine_line():
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def report(args, runs, answers, probes, loads):
    servers, mixes = list(args.base_url), list(args.mix)
    clients = (f"{args.concurrency} clients" if args.rate is None else
               f"Poisson arrivals at {args.rate}/s" + (f", at most {args.concurrency} in flight" if args.concurrency else ""))
    outputs = (f"{args.max_tokens} tokens each" if args.output_sigma == 0 else
               f"output lognormal median {args.max_tokens / 2:g} sigma {args.output_sigma} capped at {args.max_tokens}")
    print(f"\n{args.requests} requests over {len(args.tasks)} tasks ({', '.join(args.tasks)}), {clients}, "
          f"prompts lognormal median {args.prompt_words} words sigma {args.prompt_sigma}"
          + (f" after a {args.shared_prefix}-word system prompt per task" if args.shared_prefix else "")
          + f", {outputs}; "
          f"greedy, streamed; {args.rounds} round(s) interleaved; seed {args.seed}\n")
    print("| server | mix | tokens (made/planned) | tokens/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 "
          "| = alone | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mix in mixes:
        for server in servers:
            mine = [run for run in runs if run.server == server and run.mix == mix]
            results = [r for run in mine for r in run.ok]
            planned = sum(r.request.max_tokens for run in mine for r in run.results)
            ref = answers.get(server if args.reference == "self" else args.reference)
            same = (f"{sum(ref[r.request] == r.text for r in results)}/{len(results)}"
                    if ref is not None else "-")
            ttft, latency = [r.ttft for r in results], [r.latency for r in results]
            print(f"| {server} | {mix} | {sum(r.tokens for r in results)}/{planned} "
                  f"| {statistics.median(run.tokens_per_s for run in mine):.1f} "
                  f"| {pct(ttft, 50):.2f} s | {pct(ttft, 95):.2f} s | {pct(latency, 50):.2f} s "
                  f"| {pct(latency, 95):.2f} s | {same} | {sum(len(run.results) - len(run.ok) for run in mine)} |")
    if len(servers) > 1:
        first = servers[0]
        print()
        for other in servers[1:]:
            for mix in mixes:
                pairs = [(a, b) for a, b in zip([r for r in runs if r.server == first and r.mix == mix],
                                                [r for r in runs if r.server == other and r.mix == mix])]
                speed = statistics.median(a.tokens_per_s / b.tokens_per_s for a, b in pairs)
                p95 = statistics.median(pct([r.latency for r in a.ok], 95) / pct([r.latency for r in b.ok], 95)
                                        for a, b in pairs)
                both = [(x, y) for a, b in pairs for x, y in zip(a.results, b.results) if not (x.error or y.error)]
                equal = sum(x.text == y.text for x, y in both)
                # a server that ignores ignore_eos stops at EOS: its answer is then the start of the other's
                early = sum(x.text != y.text and (x.text.startswith(y.text) or y.text.startswith(x.text))
                            for x, y in both)
                print(f"- {mix}: {first} reaches {speed:.2f}x {other}'s tokens/s, at {p95:.2f}x its p95 latency; "
                      f"the same answers in {equal}/{len(both)} pairs"
                      + (f", and in {early} more one server stopped early (EOS) with the start of the other's answer"
                         if early else ""))
    if probes:
        print(f"\nShort behind long: a {SHORT_TOKENS}-token request sent while a {args.long_tokens}-token one is "
              "generating (another task), vs alone\n")
        print("| server | short alone | short behind long | ratio | long request's tokens |")
        print("|---|---|---|---|---|")
        for server in servers:
            mine = [p for s, p in probes if s == server]
            solo, behind = statistics.median(p[0] for p in mine), statistics.median(p[1] for p in mine)
            print(f"| {server} | {solo:.2f} s | {behind:.2f} s | {statistics.median(p[1] / p[0] for p in mine):.1f}x "
                  f"| {mine[0][2]} |")
    print(f"\nMachine: {machine_line()}; load average {loads[0]:.2f} before, {loads[1]:.2f} after. "
          f"Command: python bench/serve.py {shlex.join(sys.argv[1:])}")


def save(path, runs, answers, probes):
    """The raw results, for a second look: per run its wall time and requests, per server its alone answers."""
    data = {"runs": [{"server": run.server, "mix": run.mix, "wall": run.wall,
                      "results": [dataclasses.asdict(r) for r in run.results]} for run in runs],
            "alone": {name: [{**dataclasses.asdict(request), "text": text} for request, text in by_request.items()]
                      for name, by_request in answers.items()},
            "probes": [{"server": name, "short_alone": p[0], "short_behind_long": p[1], "long_tokens": p[2]}
                       for name, p in probes]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=True)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--base-url", nargs="+", action="extend", required=True, metavar="NAME=URL",
                   help="an OpenAI-compatible server, e.g. ours=http://127.0.0.1:8000/v1 (repeatable; NAME= optional)")
    p.add_argument("--models", required=True, help="the task names every server serves, joined by commas "
                                                    "(the first is the skewed mix's main task)")
    p.add_argument("--requests", type=int, default=48, help="requests in the trace")
    p.add_argument("--concurrency", type=int, help="closed-loop clients (default 8); with --rate, the most in flight")
    p.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s instead of closed-loop clients")
    p.add_argument("--max-tokens", type=int, default=32, help="the longest planned answer, in tokens")
    p.add_argument("--output-sigma", type=float, default=0.7,
                   help="spread of the planned answer lengths (lognormal, median --max-tokens/2); 0: all --max-tokens")
    p.add_argument("--prompt-words", type=int, default=48, help="median prompt length in words (~1.3 tokens each)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                   help="a system prompt of this many words (about 1.3 tokens each), one per task, in front of every "
                        "prompt of the task: the shared-prefix trace (prefix caching)")
    p.add_argument("--prompt-sigma", type=float, default=0.8, help="spread of the prompt lengths (lognormal)")
    p.add_argument("--prompt-max-words", type=int, default=400, help="the longest prompt, in words")
    p.add_argument("--mix", nargs="+", choices=["uniform", "skewed"], default=["uniform", "skewed"])
    p.add_argument("--skew", type=float, default=0.9, help="the skewed mix's share on the first task")
    p.add_argument("--rounds", type=int, default=1, help="times each trace runs on each server, interleaved")
    p.add_argument("--reference", default="self",
                   help="where '= alone' answers come from: self (each server, one request at a time), the NAME of "
                        "one --base-url, another URL, or none")
    p.add_argument("--long-tokens", type=int, default=300, help="the long request of the short-behind-long probe")
    p.add_argument("--no-probe", action="store_true", help="skip the short-behind-long probe")
    p.add_argument("--save", help="also write every request's result and alone answer to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    urls = {}
    for i, entry in enumerate(args.base_url):
        name, sep, url = entry.partition("=")
        name, url = (name, url) if sep and "://" not in name else (f"server{i}" if len(args.base_url) > 1 else "server", entry)
        if name in urls:
            p.error(f"--base-url: the name {name} is given twice")
        urls[name] = url
    args.base_url = urls
    args.tasks = [t for t in args.models.split(",") if t]
    if not args.tasks:
        p.error("--models: name at least one task, e.g. --models task0,task1,task2")
    if args.rate is None and args.concurrency is None:
        args.concurrency = 8
    for flag, value in (("--requests", args.requests), ("--max-tokens", args.max_tokens), ("--rounds", args.rounds),
                        ("--concurrency", args.concurrency or 1), ("--rate", args.rate or 1)):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    return args


async def check_models(name, client, tasks):
    try:
        served = {m.id async for m in client.models.list()}
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        sys.exit(f"error: cannot list the models of {name} at {client.base_url} ({type(e).__name__}: {e}); "
                 "is the server running?")
    missing = [t for t in tasks if t not in served]
    if missing:
        sys.exit(f"error: {name} at {client.base_url} does not serve {', '.join(missing)}; it serves "
                 f"{', '.join(sorted(served))}. Pass --models with names every server serves")


async def main(args):
    clients = {name: client_for(url) for name, url in args.base_url.items()}
    if args.reference not in ("self", "none", *clients):
        clients[args.reference] = client_for(args.reference)
    for name, client in clients.items():
        await check_models(name, client, args.tasks)
    traces, arrivals = make_trace(args, args.tasks), arrival_times(args)
    loads = [os.getloadavg()[0]]
    log(f"warm-up: one request per task on {', '.join(clients)}")
    for client in clients.values():
        for task in args.tasks:
            await send(client, Request(task, "Warm up.", 4))
    runs, probes = [], []
    for round in range(args.rounds):
        for mix, requests in traces.items():
            for name in args.base_url:
                runs.append(await run_trace(name, clients[name], mix, requests, args, arrivals))
        if not args.no_probe:
            for name in args.base_url:
                probes.append((name, await short_behind_long(clients[name], args.tasks, args.long_tokens, args.seed + round)))
                log(f"{name} short behind long: {probes[-1][1][1]:.2f} s, alone {probes[-1][1][0]:.2f} s")
    every = [r for requests in traces.values() for r in requests]
    answers = {}
    if args.reference != "none":
        for name in (args.base_url if args.reference == "self" else [args.reference]):
            log(f"{name}: each request alone")
            answers[name] = {request: result.text for request, result in (await alone(clients[name], every)).items()}
    loads.append(os.getloadavg()[0])
    if args.save:
        save(args.save, runs, answers, probes)
    report(args, runs, answers, probes, loads)


T0 = time.perf_counter()
if __name__ == "__main__":
    asyncio.run(main(parse_args()))
