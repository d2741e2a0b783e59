"""Quantized base models, measured: LoRA training step memory and speed per quantization, and decode speed.

    .venv/bin/python bench/quant.py              # all of it; a 1b step is ~18 TFLOP: minutes each on 2 cores
    .venv/bin/python bench/quant.py --shape small --seq_len 64 --decode_tokens 8 --repeats 1   # a quick check
    .venv/bin/python bench/quant.py --parts train --runs float32,nf4,peft-nf4     # a subset
    .venv/bin/python bench/quant.py --parts load --threads 1   # load peaks: ours, the old way, transformers' bnb

Training (--parts train): a Llama with random weights, shaped like TinyLlama-1.1B (--shape 1b: hidden 2048,
22 layers, MLP 5632, 32 heads / 4 KV heads, vocab 32000; --shape small for a quick check), written once to a
temporary folder in bfloat16 and loaded in float32 by every run. Each run adds LoRA r=16 alpha=32 to all
linear layers, turns on non-reentrant gradient checkpointing and trains --steps AdamW steps on the same seeded
random batch of --batch_size x --seq_len tokens (every position a target):
  float32, nf4, fp4, int8, w8a16   lora-pytorch: lora.load_model(quantize=...), lora.inject, its chunked
                                   loss (lora.loss.CausalLMLoss), as `lora finetune` trains
  nf4-bf16                         the same with --dtype bfloat16 --compute_dtype bfloat16: the embedding,
                                   norms and head stored in bfloat16, 4-bit matmuls in bfloat16
  peft-nf4, peft-fp4, peft-int8    PEFT + bitsandbytes as its QLoRA recipe runs: transformers' loader with
                                   BitsAndBytesConfig (the record lora.quant.quantization_config gives),
                                   prepare_model_for_kbit_training, get_peft_model, model(**batch).loss
Every run is its own process. Reported: the peak RSS of the training steps (the kernel's high-water mark,
reset after setup and after glibc's malloc_trim gave the replaced float weights back), the RSS the loaded
model holds before the first step, the process's peak including loading, and the median seconds of the
steps after the first (input tokens per second from it) and their median CPU seconds (all threads'; on shared
cores the steadier figure of the work a step takes). Peak RSS depends on glibc's allocator, which keeps freed
blocks of up to 32 MiB for reuse: with MALLOC_MMAP_THRESHOLD_=1048576 in the environment (every run inherits it)
freed blocks go back to the OS and the peak is close to the memory a step uses, at some CPU cost.

Loading (--parts load, the same random model; each run its own process): float32, nf4, fp4, int8, w8a16
lora.load_model(quantize=...) (a quantized base is quantized as its safetensors are read); whole-nf4 loads it whole
in float32 with transformers and then runs lora.quant.quantize_model (what load_model did before);
transformers-nf4, transformers-int8 transformers' loader with BitsAndBytesConfig (PEFT's QLoRA recipe). Reported:
the process's RSS high-water mark (the load's peak; Python with torch, transformers and bitsandbytes imported is
the floor), the RSS once loaded and the CPU seconds of the load.

Decode (--parts decode): single-stream greedy decoding on SmolLM2-135M-Instruct, each run its own process, the same
prompt ids, end-of-sequence ignored: float32, w8a16, w8a16-head (its tied head too): transformers' generate;
engine-float32, engine-w8a16 (the head too: the serving default), engine-w8a16-float-head (--no-quantize-head),
engine-nf4: MultiTaskModel(quantize=...) and lora's engine, as `lora serve --quantize` runs, the base model;
engine-w4a16 (the packaged GGUF's Q4_1 blocks on PyTorch's int4 kernel, the head int4 too), engine-w4a16-float-head;
engine-w8a16-task, engine-w4a16-task: serving a seeded random all-linear r=8 adapter (every step runs the per-token
update);
engine-*-compiled: Engine(enforce_eager=False) once its background compile is done (the time it took is printed);
engine-w8a16-compiled-task: both, the task's update inside the compiled graph (compiled after the warm-up's first
task step, then warmed up again);
llama.cpp-q8_0: llama-cpp-python (run by --llama_python) on the same weights as a Q8_0 GGUF (the packaged GGUF's
Q4_1 tensors de-quantized, as lora.load_model does, and written as Q8_0; the tied token_embd stays Q8_0; cached
in --cache); llama.cpp-q4_1: the same on the packaged Q4_1 GGUF itself (the very weights engine-w4a16 runs).
Tokens per second after the first token (generate's runs count the prefill too) and CPU ms per
token (all threads), the best of --repeats after an 8-token warm-up.

Prints markdown tables, the goals met or not (nf4 step peak <= 0.35x float32; nf4 step speed >= 0.9x PEFT +
bitsandbytes; the w8a16 engine's decode >= 3x the float32 engine's and >= 0.5x llama.cpp's Q8_0), the machine,
versions and load before and after.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are local or random
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from machine import cpu_model, load_average  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lora, not an installed one

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096),
}
LOAD_RUNS = ("float32", "nf4", "fp4", "int8", "w8a16", "whole-nf4", "transformers-nf4", "transformers-int8")
TRAIN_RUNS = ("float32", "nf4", "nf4-bf16", "fp4", "int8", "w8a16", "peft-nf4", "peft-fp4", "peft-int8")
DECODE_RUNS = ("float32", "w8a16", "w8a16-head", "nf4", "int8", "engine-float32", "engine-w8a16",
               "engine-w8a16-float-head", "engine-w8a16-task", "engine-w8a16-compiled", "engine-float32-compiled",
               "engine-w8a16-compiled-task", "engine-nf4", "engine-w4a16", "engine-w4a16-float-head",
               "engine-w4a16-task", "engine-w4a16-compiled", "engine-w4a16-compiled-task", "llama.cpp-q8_0",
               "llama.cpp-q4_1")
LLAMA_PYTHON = "/work/llama-venv/bin/python"  # a venv with llama-cpp-python (bench/README.md)
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--parts", default="train,decode", help="comma-separated: load, train, decode")
p.add_argument("--shape", choices=SHAPES, default="1b")
p.add_argument("--runs", default="float32,nf4,int8,w8a16,peft-nf4,peft-int8",
               help=f"training runs, comma-separated, in order: {', '.join(TRAIN_RUNS)}")
p.add_argument("--load_runs", default="float32,nf4,whole-nf4,transformers-nf4",
               help=f"load runs, comma-separated: {', '.join(LOAD_RUNS)}")
p.add_argument("--steps", type=int, default=3, help="optimizer steps per training run (the first is not timed)")
p.add_argument("--batch_size", type=int, default=4)
p.add_argument("--seq_len", type=int, default=512)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--decode_runs", default="float32,w8a16,w8a16-head,engine-float32,engine-w8a16-float-head,"
               "engine-w8a16,engine-w8a16-task,llama.cpp-q8_0", help=f"comma-separated: {', '.join(DECODE_RUNS)}")
p.add_argument("--llama_python", default=LLAMA_PYTHON, help="the python that has llama-cpp-python")
p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lora-bench-quant"),
               help="where the Q8_0 GGUF and the random adapter are kept between runs")
p.add_argument("--decode_tokens", type=int, default=128)
p.add_argument("--repeats", type=int, default=2, help="decode runs per quantization, best kept")
p.add_argument("--threads", type=int, default=os.cpu_count())
p.add_argument("--workdir", default=None, help="where the random model is written (default: a temp folder)")
p.add_argument("--child", default=None, help=argparse.SUPPRESS)
p.add_argument("--run", default=None, help=argparse.SUPPRESS)
p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Reset the kernel's high-water mark of this process's RSS (VmHWM), so it measures from now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory():
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so RSS shows what the run holds."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def gib(kib):
    return kib / 2**20


# ---------------------------------------------------------------- children: one run each, JSON on stdout

def write_random_model(args, folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq_len),
                         tie_word_embeddings=False, initializer_range=0.02)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    # lora.load_model loads a tokenizer too: a one-word one will do (these runs feed token ids)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(folder)


def ours(args, method):
    import lora
    from lora.loss import CausalLMLoss

    method, _, bf16 = method.partition("-")  # nf4-bf16: --dtype bfloat16 --compute_dtype bfloat16
    model = lora.load_model(args.model_dir, dtype="bfloat16" if bf16 else "float32",
                            quantize=None if method == "float32" else method,
                            compute_dtype="bfloat16" if bf16 else None)[0]
    lora.inject(model, "all-linear", r=args.rank, alpha=2 * args.rank)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    loss_fn = CausalLMLoss(model)
    return model, lora.lora_parameters(model), lambda batch, targets: loss_fn(batch) / targets


def peft(args, method):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora.quant import quantization_config

    record = {k: v for k, v in quantization_config(method).items() if k != "quant_method"}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(**record))
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, lambda batch, targets: model(**batch).loss


def train_child(args):
    run = args.run
    whole_peak_before = status_kib("VmHWM")  # python + torch + transformers imported: the floor
    model, params, loss_of = (peft if run.startswith("peft-") else ours)(args, run.removeprefix("peft-"))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = args.batch_size * (args.seq_len - 1)
    gc.collect()
    release_free_memory()  # the float weights quantization replaced, in every run alike
    setup_rss, load_peak = status_kib("VmRSS"), status_kib("VmHWM")
    reset_peak_rss()
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of(batch, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(float(loss.detach()))
    timed, cpu_timed = sorted(times[1:] or times), sorted(cpu_times[1:] or cpu_times)
    return {"run": run, "step_peak_gib": gib(status_kib("VmHWM")), "setup_rss_gib": gib(setup_rss),
            "load_peak_gib": gib(max(load_peak, status_kib("VmHWM"))), "floor_gib": gib(whole_peak_before),
            "step_s": timed[len(timed) // 2], "step_cpu_s": cpu_timed[len(cpu_timed) // 2],
            "tokens_per_s": args.batch_size * args.seq_len / timed[len(timed) // 2],
            "losses": [round(x, 4) for x in losses], "trainable": sum(p.numel() for p in params)}


def load_child(args):
    """Load the random model one way (see LOAD_RUNS); the process's RSS high-water mark is the load's peak."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lora
    from lora.quant import quantization_config, quantize_model

    floor, cpu, method = status_kib("VmHWM"), time.process_time(), args.run.split("-")[-1]
    if args.run.startswith("transformers-"):
        record = {k: v for k, v in quantization_config(method).items() if k != "quant_method"}
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(**record))
    elif args.run.startswith("whole-"):
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        quantize_model(model, method)
    else:
        model = lora.load_model(args.model_dir, quantize=None if method == "float32" else method)[0]
    assert model is not None  # held while RSS is read
    return {"run": args.run, "load_peak_gib": gib(status_kib("VmHWM")), "loaded_rss_gib": gib(status_kib("VmRSS")),
            "floor_gib": gib(floor), "load_cpu_s": time.process_time() - cpu}


def timed(run, stamps, cpu_seconds, sample):
    """A decode run's result from each token's time stamp: the rate after the first token (no prefill)."""
    return {"run": run, "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps),
            "cpu_ms_per_token": cpu_seconds / len(stamps) * 1e3, "rss_gib": gib(status_kib("VmRSS")), "sample": sample}


@torch.no_grad()
def engine_decode(args):
    """`lora serve --quantize`'s path: MultiTaskModel(quantize=...) and the continuous-batching engine, one stream."""
    import lora
    from lora.engine import Engine, SamplingParams

    name, *options = args.run.removeprefix("engine-").split("-", 1)  # e.g. w8a16, ["float-head"]
    task = "task" if options and options[0].endswith("task") else None
    compiled = bool(options) and options[0].startswith("compiled")
    mt = lora.MultiTaskModel("smollm2-135m", {"task": args.adapter} if task else None, device="cpu",
                             quantize=None if name == "float32" else name,
                             quantize_head=False if options == ["float-head"] else None)
    gc.collect()
    release_free_memory()
    ids = mt.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    engine, start = Engine(mt, max_num_seqs=1, enforce_eager=not compiled), time.perf_counter()
    compile_s = None
    for _ in range(2 if compiled and task else 1):  # a task's first step starts compiling its graph
        if compiled and not engine.runner.compiled.wait():
            raise RuntimeError(f"compiling failed: {engine.runner.compiled.error!r}")
        compile_s = time.perf_counter() - start if compiled else None
        engine.generate([ids], [task], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    steps = engine.stats()["compiled_steps_total"]
    stamps, tokens, done = [], [], []

    def on_output(out):
        stamps.append(time.perf_counter())
        tokens.extend(out.new_token_ids)
        done.append(out.finished)
    cpu = time.process_time()
    engine.add_request(ids, task, SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True), on_output)
    while not (done and done[-1]):
        engine.step()
    if compiled and engine.stats()["compiled_steps_total"] - steps < args.decode_tokens - 1:
        raise RuntimeError(f"decode steps ran eager: {engine.stats()}")
    return {**timed(args.run, stamps, time.process_time() - cpu, mt.tokenizer.decode(tokens[:24])), "compile_s": compile_s}


def q8_0_gguf(cache):
    """SmolLM2's packaged GGUF as llama.cpp's Q8_0 file (see the module doc), written once into `cache`."""
    import gguf

    from lora.export.gguf_merged import dequantized, rewrite_gguf
    from lora.models import smollm2_gguf
    path = os.path.join(cache, "SmolLM2-135M-Instruct.Q8_0.gguf")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        q4_1 = gguf.GGMLQuantizationType.Q4_1
        rewrite_gguf(gguf.GGUFReader(smollm2_gguf()), path, lambda t: dequantized(t) if t.tensor_type == q4_1 else None,
                     "q8_0")
    return path


def llama_cpp_decode(args):
    """llama.cpp on the Q8_0 GGUF (or the packaged Q4_1 one): the same prompt ids, greedy, as many threads; run by
    --llama_python."""
    from llama_cpp import Llama  # noqa: I001 - then this checkout's lora
    from lora.models import load_tokenizer, smollm2_gguf
    ids = load_tokenizer("smollm2-135m").apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    path = smollm2_gguf() if args.run == "llama.cpp-q4_1" else q8_0_gguf(args.cache)
    llm = Llama(model_path=path, n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False)
    for n, stamps, tokens in ((8, [], []), (args.decode_tokens, [], [])):  # a warm-up, then the timed run
        cpu = time.process_time()
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == n:
                break
        cpu = time.process_time() - cpu
    return timed(args.run, stamps, cpu, llm.detokenize(tokens[:24]).decode(errors="replace"))


@torch.no_grad()
def decode_child(args):
    import lora
    from lora.quant import quantize_model

    if args.run.startswith("engine-"):
        return engine_decode(args)
    if args.run.startswith("llama.cpp-"):
        return llama_cpp_decode(args)
    model, tokenizer = lora.load_model("smollm2-135m")
    if args.run != "float32":
        quantize_model(model, args.run.removesuffix("-head"), head=args.run.endswith("-head"))
    gc.collect()
    release_free_memory()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.generate(**ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(**ids, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    new = out.shape[1] - ids["input_ids"].shape[1]
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:][:24], skip_special_tokens=True)
    return {"run": args.run, "tokens_per_s": new / seconds, "tokens": new, "cpu_ms_per_token": cpu / new * 1e3,
            "rss_gib": gib(status_kib("VmRSS")), "sample": text}


# ---------------------------------------------------------------- parent: runs children, prints tables

def child(args, kind, run, model_dir=None):
    argv = [args.llama_python if run.startswith("llama.cpp") else sys.executable, __file__, "--child", kind, "--run", run,
            "--shape", args.shape, "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--seq_len",
            str(args.seq_len), "--rank", str(args.rank), "--decode_tokens", str(args.decode_tokens), "--threads",
            str(args.threads), "--cache", args.cache] + (["--adapter", args.adapter] if args.adapter else [])
    if model_dir:
        argv += ["--model_dir", model_dir]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{kind} run {run} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} {run}: {json.dumps(result)}", file=sys.stderr)
    return result


def ratio(result, reference, key):
    return f"{result[key] / reference[key]:.2f}x" if reference else "-"


def train_table(args, results):
    by = {r["run"]: r for r in results}
    base = by.get("float32")
    print(f"\n### LoRA training step: {args.shape}-shaped Llama, r={args.rank} all-linear, batch {args.batch_size} x "
          f"{args.seq_len}, gradient checkpointing, {args.steps} steps\n")
    print("| run | step peak RSS (GiB) | vs float32 | model RSS (GiB) | peak incl. load (GiB) | s/step | CPU s/step "
          "| tokens/s | vs PEFT + bnb | losses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peer = by.get("peft-" + r["run"])
        print(f"| {r['run']} | {r['step_peak_gib']:.2f} | {ratio(r, base, 'step_peak_gib')} | "
              f"{r['setup_rss_gib']:.2f} | {r['load_peak_gib']:.2f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {ratio(r, peer, 'tokens_per_s')} | {' '.join(map(str, r['losses']))} |")
    nf4, peer = by.get("nf4"), by.get("peft-nf4")
    for run in ("nf4", "nf4-bf16"):
        if run in by and base:
            x = by[run]["step_peak_gib"] / base["step_peak_gib"]
            print(f"\nGoal {run} step peak <= 0.35x float32: {x:.2f}x, {'met' if x <= 0.35 else 'NOT met'}")
    if nf4 and peer:
        x = nf4["tokens_per_s"] / peer["tokens_per_s"]
        print(f"Goal nf4 step speed >= 0.9x PEFT + bitsandbytes: {x:.2f}x, {'met' if x >= 0.9 else 'NOT met'}")
        print(f"  (CPU time per step, PEFT's / ours: {peer['step_cpu_s'] / nf4['step_cpu_s']:.2f}x: the same figure "
              "from CPU seconds, steadier on shared cores)")


def load_table(args, results):
    print(f"\n### Loading the {args.shape}-shaped Llama (bfloat16 safetensors) in float32 or quantized\n")
    print("| run | peak RSS while loading (GiB) | RSS loaded (GiB) | Python + libraries before (GiB) | CPU s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['load_peak_gib']:.2f} | {r['loaded_rss_gib']:.2f} | {r['floor_gib']:.2f} | "
              f"{r['load_cpu_s']:.1f} |")


def decode_table(args, results):
    best = {}
    for r in results:
        if r["run"] not in best or r["tokens_per_s"] > best[r["run"]]["tokens_per_s"]:
            best[r["run"]] = r
    base, llama = best.get("engine-float32"), best.get("llama.cpp-q8_0")
    print(f"\n### Single-stream decode, SmolLM2-135M-Instruct, {args.decode_tokens} greedy tokens, {args.threads} "
          f"threads, best of {args.repeats} (engine-*: `lora serve --quantize`'s path)\n")
    print("| run | tokens/s | CPU ms/token | vs engine-float32 | vs llama.cpp Q8_0 | RSS (GiB) | first words |")
    print("|---|---|---|---|---|---|---|")
    for run, r in best.items():
        print(f"| {run} | {r['tokens_per_s']:.1f} | {r['cpu_ms_per_token']:.1f} | {ratio(r, base, 'tokens_per_s')} | "
              f"{ratio(r, llama, 'tokens_per_s')} | {r['rss_gib']:.2f} | {r['sample']!r} |")
    for run, r in best.items():
        if r.get("compile_s"):
            print(f"\n{run}: its background compile took {r['compile_s']:.0f} s before the first compiled step")
    for run in ("engine-w4a16", "engine-w4a16-compiled"):
        if best.get(run) and best.get("llama.cpp-q4_1"):
            print(f"\n{run} vs llama.cpp on the same Q4_1 GGUF: {ratio(best[run], best['llama.cpp-q4_1'], 'tokens_per_s')}")
    ours = best.get("engine-w8a16")
    if ours and base:
        x = ours["tokens_per_s"] / base["tokens_per_s"]
        print(f"\nGoal `--quantize int8` (w8a16) engine decode >= 3x the float32 engine: {x:.2f}x, {'met' if x >= 3 else 'NOT met'}")
    if ours and llama:
        x = ours["tokens_per_s"] / llama["tokens_per_s"]
        print(f"Goal `--quantize int8` engine decode >= 0.5x llama.cpp on the Q8_0 GGUF: {x:.2f}x, "
              f"{'met' if x >= 0.5 else 'NOT met'}")


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main():
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({"load": load_child, "train": train_child, "decode": decode_child}[args.child](args)))
        return
    parts = args.parts.split(",")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads, {platform.system()} "
          f"{platform.machine()}; {versions()}; load average before: {load_average()}")
    load_runs, runs = args.load_runs.split(",") if "load" in parts else [], args.runs.split(",") if "train" in parts else []
    unknown = [r for r in load_runs if r not in LOAD_RUNS] + [r for r in runs if r not in TRAIN_RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; --load_runs: {', '.join(LOAD_RUNS)}; --runs: {', '.join(TRAIN_RUNS)}")
    if load_runs or runs:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="quant-bench-") as folder:
            print(f"writing a random {args.shape}-shaped Llama to {folder}", file=sys.stderr)
            write_random_model(args, folder)
            loaded = [r for run in load_runs if (r := child(args, "load", run, folder))]
            results = [r for run in runs if (r := child(args, "train", run, folder))]
        if loaded:
            load_table(args, loaded)
        if results:
            train_table(args, results)
    if "decode" in parts:
        runs = args.decode_runs.split(",")
        unknown = [r for r in runs if r not in DECODE_RUNS]
        if unknown:
            p.error(f"unknown --decode_runs {unknown}; choose from {', '.join(DECODE_RUNS)}")
        if any(run.endswith("-task") for run in runs):
            from make_adapters import make_adapters  # bench/make_adapters.py
            args.adapter = str(make_adapters(os.path.join(args.cache, "adapters"), tasks=1)["task0"])
        results = [r for _ in range(args.repeats) for run in runs if (r := child(args, "decode", run))]
        decode_table(args, results)
    print(f"\nLoad average after: {load_average()}")


if __name__ == "__main__":
    main()
