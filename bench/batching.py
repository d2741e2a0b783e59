"""Generation through the continuous-batching engine, measured: its task policies vs PEFT, precision, one stream.

    .venv/bin/python bench/batching.py                  # SmolLM2-135M, 8 adapters, float32: speed table + single stream
    .venv/bin/python bench/batching.py --threads 2      # wall-clock time with 2 threads, on an idle machine
    .venv/bin/python bench/batching.py --dtypes float32,bfloat16,float16   # precision table instead of speed
    .venv/bin/python bench/batching.py --shape llama-1b # the GPU workload: 1B-shaped Llama, bf16, 128 x 64 tokens
    .venv/bin/python bench/batching.py --shape llama-1b --requests 8 --max-new-tokens 4 --alone 4  # ...checked on CPU

Speed. Two workloads with the same prompts: skewed (90% of requests for one task, the rest spread over the
others) and uniform (every task equally often). Each policy answers the same requests, greedy, with exactly
--max-new-tokens new tokens each (min_new_tokens), so tokens/s compare like for like:
  auto    MultiTaskModel.generate_responses(mode="auto"): the engine runs a step on a task's merged weights
          when every sequence in it uses that task, else on the base weights plus per-token updates
  mixed   mode="mixed": per-token updates at every step (vLLM / S-LoRA / LoRAX style)
  merged  mode="merged": one task's merged weights at a time; requests for other tasks wait their turn
  PEFT    PeftModel.generate(adapter_names=[...]) on static batches of --batch-size, in arrival order
The policies take turns within each repeat, and each counts with its best of --repeats. On the CPU with one
thread (the default) the clock is the process's CPU time, which other processes on a shared machine change
far less than wall time (measured at load 10 on 2 cores: a forward's wall time varied 2.2-4.0 s, its CPU time
0.30-0.38 s); on a GPU or with more threads it is wall time. Each answer is also compared with the same
request run alone (the engine with one sequence at a time, greedy): in float32 they must all be equal.
Single stream: one request, one task, the engine on merged weights vs transformers' generate on the
plain base model, same prompt and number of greedy tokens (the engine also runs the base model, whose
tokens must equal generate's).

Precision (--dtypes). The share of answers equal to the same request alone, per dtype and mode, on the
uniform workload (nearly every step mixes tasks). Mixed steps compute each token's low-rank update in
float32 and round once when adding it (lora.mixed); one column computes it in the model's
dtype instead, as a plain unmerged LoRA layer would, to show what the float32 update buys. The last
column compares mixed answers with the same request alone in mixed mode too: what batching changes,
apart from merged vs unmerged rounding.

The adapters are random (seeded), A and B drawn from N(0, 0.02): large enough to change the answers.
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
from machine import clock, cpu_model

import lora
from lora.engine import Engine, SamplingParams
from lora.models import load_tokenizer, resolve_device, resolve_dtype

# Per shape: the model, the adapters and the workload. llama-1b is the GPU workload (a 1B-shaped Llama).
SHAPES = {
    None: dict(targets=["q_proj", "v_proj"], r=8, dtype="float32", requests=48, max_new_tokens=16, batch_size=16,
               alone=16),
    "llama-1b": dict(targets="all-linear", r=16, dtype="bfloat16", requests=128, max_new_tokens=64, batch_size=32,
                     alone=32, config=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                           num_attention_heads=32, num_key_value_heads=8)),
}
POLICIES = ("auto", "mixed", "merged", "PEFT")

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m", help="the model (with --shape: whose tokenizer to use)")
p.add_argument("--shape", choices=[s for s in SHAPES if s], default=None,
               help="a randomly initialised model of this shape instead of --model's weights")
p.add_argument("--device", default="auto")
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32; bfloat16 with --shape")
p.add_argument("--dtypes", help="comma-separated dtypes: measure answer agreement per dtype instead of speed")
p.add_argument("--tasks", type=int, default=8)
p.add_argument("--requests", type=int, help="requests per workload (default 48; 128 with --shape)")
p.add_argument("--skew", type=float, default=0.9, help="share of the skewed workload that goes to one task")
p.add_argument("--batch-size", type=int, help="running sequences / PEFT batch size (default 16; 32 with --shape)")
p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 16; 64 with --shape)")
p.add_argument("--alone", type=int, help="requests per workload whose answers the speed run checks against the same "
                                         "request alone (default 16; 32 with --shape; 0: all). --dtypes checks all")
p.add_argument("--stream-tokens", type=int, default=64, help="tokens of the single-stream comparison")
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--threads", type=int, default=1, help="torch threads; with 1 (on the CPU) CPU time is the clock")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
shape = SHAPES[args.shape]
for name in ("dtype", "requests", "batch_size", "max_new_tokens", "alone"):
    if getattr(args, name) is None:
        setattr(args, name, shape[name])

try:
    import peft
    from peft import PeftModel
except ImportError:
    sys.exit("bench/batching.py compares against PEFT: pip install peft (or make install, which installs the dev extras)")
import transformers

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls deprecated transformers APIs
torch.set_num_threads(args.threads)
DEVICE = resolve_device(args.device)
t_start, load_start = time.perf_counter(), os.getloadavg()[0]
# One thread's CPU time hardly counts the time other processes hold the core; see the docstring.
CLOCK, CPU = clock(args.threads if DEVICE == "cpu" else 0)
UNIT = "tokens per CPU-second" if CPU else "tokens/s"
PROMPT_FORMAT = "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n"
INSTRUCTIONS = ["Summarize the text in one sentence.", "Translate the text to French.", "List three facts from the text.",
                "What is the main topic of the text?", "Write a headline for the text.", "Answer briefly: who is named?"]
TEXTS = ["The city council approved a new bike lane on Main Street after a long public debate.",
         "A small bakery in Lyon won a national award for its sourdough bread this spring.",
         "Researchers found that the river's fish population doubled within five years of the dam removal.",
         "The museum will open a new wing dedicated to early photography next month.",
         "Heavy rain delayed the harvest, but farmers expect a good grape yield overall.",
         "The team released version two of its open-source map software with offline support."]
WORDS = sorted({w.strip(".,?:'s").lower() for line in INSTRUCTIONS + TEXTS for w in line.split()} - {""})


def log(message):
    print(f"  [{time.perf_counter() - t_start:4.0f} s] {message}", file=sys.stderr, flush=True)


def random_model(folder):
    """--shape's config with random weights and --model's tokenizer, saved as a model folder; returns it loaded."""
    tokenizer = load_tokenizer(args.model)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), **shape["config"], **ids)
    torch.manual_seed(args.seed)
    with torch.device(DEVICE):  # random init of a 1B model is much faster on a GPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def make_adapters(folder):
    """The base model's folder (a random one with --shape) and --tasks random adapters for it."""
    if args.shape:
        model_path = os.path.join(folder, args.shape)
        model = random_model(model_path)
    else:
        model_path = args.model
        model, _ = lora.load_model(model_path)
    lora.inject(model, shape["targets"], r=shape["r"], alpha=2 * shape["r"])
    torch.manual_seed(args.seed)
    paths = {}
    for t in range(args.tasks):
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_A.normal_(0, 0.02)
                layer.lora_B.normal_(0, 0.02)
        paths[f"task{t}"] = lora.save_adapter(model, os.path.join(folder, f"task{t}"), model_path,
                                              task={"prompt_format": PROMPT_FORMAT})
    return model_path, paths


def workloads(names):
    """{label: requests in arrival order}; both workloads have the same prompts, only their tasks differ."""
    rng = random.Random(args.seed)
    if args.shape:  # prompts of 4-24 random words, as the GPU workload's
        prompts = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 24)))} for _ in range(args.requests)]
    else:
        prompts = [{"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)],
                    "input": TEXTS[(i // len(INSTRUCTIONS) + i) % len(TEXTS)]} for i in range(args.requests)]
    n_main = round(args.skew * args.requests)
    skewed = [names[0]] * n_main + [names[1 + i % (len(names) - 1)] for i in range(args.requests - n_main)]
    uniform = [names[i % len(names)] for i in range(args.requests)]
    out = {}
    for label, tasks in ((f"skewed ({args.skew:.0%} one task)", skewed), (f"uniform ({len(names)} tasks)", uniform)):
        rng.shuffle(tasks)
        out[label] = [{"downstream": task, **prompt, "max_new_tokens": args.max_new_tokens,
                       "min_new_tokens": args.max_new_tokens} for task, prompt in zip(tasks, prompts)]
    return out


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, *fn_args):
    sync()
    started = CLOCK()
    out = fn(*fn_args)
    sync()
    return CLOCK() - started, out


def alone(mt, requests):
    """Each request's answer when it runs by itself: one sequence at a time, so no step holds another."""
    return mt.generate_responses(requests, batch_size=1, mode="merged")


def agreement(answers, reference):
    return sum(a == b for a, b in zip(answers, reference))


@torch.no_grad()
def peft_static(peft_model, mt, requests):
    """PEFT's mixed-adapter batches: static, left-padded, each running until its last row is done."""
    answers, pad = [], lora.data.pad_token_id(mt.tokenizer)
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        ids = [mt.prompt_ids(r) for r in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=DEVICE)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=DEVICE)
        out = peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                  adapter_names=[r["downstream"] for r in batch], pad_token_id=pad,
                                  max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
        answers += [mt.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def speed(model_path, paths):
    """The policy table on both workloads, then the single-stream line."""
    mt = lora.MultiTaskModel(model_path, paths, device=DEVICE, dtype=args.dtype)
    base, _ = lora.load_model(model_path, dtype=args.dtype, device=DEVICE)
    peft_model = PeftModel.from_pretrained(base, paths["task0"], adapter_name="task0")
    for name in list(paths)[1:]:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()
    runners = {mode: (lambda requests, mode=mode: mt.generate_responses(requests, args.batch_size, mode))
               for mode in POLICIES[:3]}
    runners["PEFT"] = lambda requests, peft_model=peft_model: peft_static(peft_model, mt, requests)
    loads = workloads(list(paths))
    for run in runners.values():  # warm-up: first-call costs, caches
        run(list(loads.values())[1][:2])
    rows = []
    for label, requests in loads.items():
        best, answers = dict.fromkeys(POLICIES, float("inf")), {}
        for repeat in range(args.repeats):
            for policy in POLICIES[repeat % 4:] + POLICIES[:repeat % 4]:  # each takes every place in turn
                seconds, answers[policy] = timed(runners[policy], requests)
                best[policy] = min(best[policy], seconds)
            log(f"{label}, run {repeat + 1}: " + ", ".join(f"{p} {best[p]:.1f} s" for p in POLICIES))
        checked = requests[:args.alone or None]
        reference = alone(mt, checked)
        tps = {policy: len(requests) * args.max_new_tokens / seconds for policy, seconds in best.items()}
        rows.append((label, tps, {policy: agreement(answers[policy], reference) for policy in POLICIES}, len(checked)))
    del runners, peft_model, base  # single_stream loads the plain base model: one extra copy at a time

    print(f"\n{args.requests} requests per workload, {args.tasks} adapters ({shape_line()}), {args.dtype} on {DEVICE}, "
          f"--batch-size {args.batch_size}, {args.max_new_tokens} new tokens each, greedy; best of {args.repeats} "
          f"runs; {UNIT}:\n")
    print("| workload | engine auto | engine mixed | engine merged | PEFT `adapter_names` (static batches) "
          "| auto / best fixed | mixed / PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, tps, _, _ in rows:
        print(f"| {label} | {tps['auto']:.1f} | {tps['mixed']:.1f} | {tps['merged']:.1f} | {tps['PEFT']:.1f} | "
              f"{tps['auto'] / max(tps['mixed'], tps['merged']):.2f} | {tps['mixed'] / tps['PEFT']:.2f} |")
    print()
    for label, _, same, n in rows:
        print(f"- {label}: answers equal to the same request alone: "
              + ", ".join(f"{p} {same[p]}/{n}" for p in POLICIES))
    single_stream(mt, model_path, loads)


def single_stream(mt, model_path, loads):
    """One request, one task: the engine on merged weights vs transformers' generate on the plain base model."""
    base, _ = lora.load_model(model_path, dtype=args.dtype, device=DEVICE)
    request = list(loads.values())[0][0]
    ids = mt.prompt_ids(request)
    # no prefix reuse: every repeat prefills the whole prompt, as generate does
    engine = Engine(mt, max_num_seqs=1, max_model_len=len(ids) + args.stream_tokens, mode="merged",
                    enable_prefix_caching=False)
    sampling = SamplingParams(max_tokens=args.stream_tokens, min_tokens=args.stream_tokens)
    input_ids = torch.tensor([ids], device=DEVICE)

    @torch.no_grad()
    def hf_generate():
        out = base.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=args.stream_tokens, min_new_tokens=args.stream_tokens,
                            pad_token_id=lora.data.pad_token_id(mt.tokenizer))
        return out[0, len(ids):].tolist()

    runs = {"engine, task (merged)": lambda: engine.generate([ids], [request["downstream"]], sampling)[0].new_token_ids,
            "engine, base model": lambda: engine.generate([ids], [None], sampling)[0].new_token_ids,
            "transformers generate, base model": hf_generate}
    best, tokens = dict.fromkeys(runs, float("inf")), {}
    for run in runs.values():
        run()  # warm-up
    for repeat in range(3 * args.repeats):  # short runs: more rounds for a steady best
        for name in list(runs)[repeat % 3:] + list(runs)[:repeat % 3]:
            seconds, tokens[name] = timed(runs[name])
            best[name] = min(best[name], seconds)
    tps = {name: args.stream_tokens / seconds for name, seconds in best.items()}
    plain = tps["transformers generate, base model"]
    print(f"\nSingle stream ({len(ids)}-token prompt, {args.stream_tokens} greedy tokens, best of {3 * args.repeats}): "
          + "; ".join(f"{name} {value:.1f} {UNIT}" for name, value in tps.items())
          + f". Merged task / plain base: {tps['engine, task (merged)'] / plain:.2f}x. Engine's base-model tokens "
          + ("equal" if tokens["engine, base model"] == tokens["transformers generate, base model"] else "DIFFER FROM")
          + " generate's.")


def precision(model_path, paths, dtypes):
    """Per dtype and mode, how many answers of the uniform workload equal the same request alone."""
    requests = list(workloads(list(paths)).values())[1]
    columns = {"merged": "engine merged", "auto": "engine auto", "mixed": "engine mixed (update in float32, as shipped)",
               "in dtype": "engine mixed, update in the model's dtype",
               "vs mixed alone": "engine mixed vs the same request alone in mixed mode"}
    rows = []
    for dtype in dtypes:
        mt = lora.MultiTaskModel(model_path, paths, device=DEVICE, dtype=dtype)
        reference = alone(mt, requests)
        answers = {mode: mt.generate_responses(requests, args.batch_size, mode) for mode in ("merged", "auto", "mixed")}
        same = {mode: agreement(a, reference) for mode, a in answers.items()}
        if dtype != "float32":
            in_dtype = lora.MultiTaskModel(model_path, paths, device=DEVICE, dtype=dtype,
                                           update_dtype=resolve_dtype(dtype))
            same["in dtype"] = agreement(in_dtype.generate_responses(requests, args.batch_size, "mixed"), reference)
            del in_dtype
        # Which differences come from batching itself rather than from merged vs unmerged rounding.
        same["vs mixed alone"] = agreement(answers["mixed"], mt.generate_responses(requests, 1, "mixed"))
        rows.append((dtype, same))
        log(f"{dtype}: {same}")
        del mt
    n = len(requests)
    print(f"\nAnswers equal to the same request alone (merged weights unless said), uniform workload ({n} requests "
          f"over {args.tasks} adapters, {shape_line()}, --batch-size {args.batch_size}, {args.max_new_tokens} greedy "
          f"tokens each, {DEVICE}):\n")
    print("| dtype | " + " | ".join(columns.values()) + " |")
    print("|---|" + "---:|" * len(columns))
    for dtype, same in rows:
        cells = [f"{same[c]}/{n} ({same[c] / n:.0%})" if c in same else "= as shipped" for c in columns]
        print(f"| {dtype} | " + " | ".join(cells) + " |")


def shape_line():
    targets = shape["targets"] if isinstance(shape["targets"], str) else "/".join(shape["targets"])
    model = f"random {args.shape}-shaped Llama" if args.shape else args.model
    return f"{model}, {targets} r={shape['r']}"


with tempfile.TemporaryDirectory() as folder:
    model_path, paths = make_adapters(folder)
    log(f"{len(paths)} adapters written")
    if args.dtypes:
        precision(model_path, paths, [d.strip() for d in args.dtypes.split(",")])
    else:
        speed(model_path, paths)

gpu = f", {torch.cuda.get_device_name()}" if DEVICE.startswith("cuda") else ""
print(f"\nMachine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs{gpu}, "
      f"{args.threads} torch threads, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
      f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. "
      f"Whole run: {time.perf_counter() - t_start:.0f} s.")
