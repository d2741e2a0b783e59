"""Finetuning speed, memory and loss: lora-pytorch vs PEFT + transformers' Trainer and TRL's SFTTrainer, measured.

    .venv/bin/python bench/train.py                        # SmolLM2-135M, 20 steps a run, 2 repeats: ~23 min, 2 idle cores
    .venv/bin/python bench/train.py --threads 1            # on a busy shared machine
    .venv/bin/python bench/train.py --steps 40 --repeats 3 --batch_size 8     # longer and steadier
    .venv/bin/python bench/train.py --runs ours,peft --no-memory_pair         # a subset

Every run trains the same model with the same LoRA config (all-linear, r=8, alpha=16, dropout 0) on the same
token ids (a mixed-length Alpaca-format instruction set, written here, seeded: 20 to 500 tokens an example), for
the same number of optimizer steps, with AdamW, the same learning rate and a linear decay, gradient clipping at
--max_grad_norm, in float32:
  ours           lora finetune, padded batches of --batch_size examples
  ours-packing   lora finetune --packing: rows of --max_seq_length holding several examples
  ours-group     lora finetune --group_by_length (not run by default)
  peft           PEFT + Trainer, padded batches (DataCollatorForSeq2Seq, prompt tokens masked)
  peft-group     the same with Trainer's group_by_length (not run by default)
  trl-packing    PEFT + TRL's SFTTrainer, packing="bfd" (padding-free rows, its default packing)
A packed run's batch is --packed_batch_size rows, by default the number of rows that hold as many tokens as
--batch_size average examples, so each optimizer step of every run sees about the same amount of data and
"validation loss at equal steps" compares like with like.

Runs take turns (ours, peers, ours, peers ...), each in its own process: peak RSS is that process's own
(os.wait4), from model load to the end. Reported per run: real (non-padding) input tokens and target (answer)
tokens trained per second of training (first forward to last optimizer step: model loading, tokenizing, packing
and validation are not timed); peak RSS; the mean train loss of the last 5 steps as the run logged it; and the
validation loss, which this script computes the same way for every run's saved adapter (token-weighted mean over
the validation set). Throughput is the best of --repeats (load from other processes only ever slows a run down).
Then a pair of `ours-packing` runs at --memory_seq_length 1024, with and without --gradient_checkpointing, for
peak memory. Prints markdown tables, the goals met or not, the machine and its load before and after.
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: the model is local, the data generated
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from machine import cpu_model, load_average  # bench/machine.py: this script's folder is on sys.path
from torch.optim.optimizer import register_optimizer_step_post_hook

import lora
from lora.data import IGNORE_INDEX, load_examples, pad_token_id
from lora.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"ours": "lora finetune", "ours-packing": "lora finetune --packing",
        "ours-group": "lora finetune --group_by_length", "peft": "PEFT + Trainer",
        "peft-group": "PEFT + Trainer, group_by_length", "trl-packing": "PEFT + TRL SFTTrainer, packing"}
PROMPT_FORMAT = "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--runs", default="ours,ours-packing,peft,trl-packing",
               help=f"comma-separated, in the order they take turns: {', '.join(RUNS)}")
p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--batch_size", type=int, default=4, help="examples per padded batch")
p.add_argument("--packed_batch_size", type=int, default=0,
               help="rows per packed batch (0: as many tokens as --batch_size average examples, at least 1)")
p.add_argument("--gradient_accumulation_steps", type=int, default=1)
p.add_argument("--max_seq_length", type=int, default=512)
p.add_argument("--learning_rate", type=float, default=3e-4)
p.add_argument("--max_grad_norm", type=float, default=1.0)
p.add_argument("--train_examples", type=int, default=0,
               help="0: enough that no run starts a second epoch (4x what a padded run reads, at least 1000)")
p.add_argument("--validation_examples", type=int, default=48)
p.add_argument("--memory_seq_length", type=int, default=1024, help="--max_seq_length of the gradient checkpointing pair")
p.add_argument("--memory_steps", type=int, default=2)
p.add_argument("--memory_pair", default=True, action=argparse.BooleanOptionalAction,
               help="the pair of runs with and without --gradient_checkpointing")
p.add_argument("--threads", type=int, default=os.cpu_count(),
               help="torch threads per run; on a busy machine 1 is faster and steadier")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save", help="also write every run's raw measurements to this JSON file")
p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one training run in this process
p.add_argument("--child_options", default="{}", help=argparse.SUPPRESS)
p.add_argument("--data", help=argparse.SUPPRESS)
p.add_argument("--out", help=argparse.SUPPRESS)
args = p.parse_args()


# ------------------------------------------------------------------- data: mixed lengths, as instruction data is
def example_records(split):
    """The repo's three example tasks (extraction, QA, headlines) as generic instruction records."""
    files = ("train",) if split == "train" else ("validation", "test")
    read = lambda task: [r for f in files for r in json.loads((ROOT / "examples" / task / f"{f}.json").read_text())]  # noqa: E731
    extraction = [{"instruction": "Extract the booking details from this request as a one-line JSON object with the "
                                  "keys name, party_size (a number), day, time and restaurant.",
                   "input": r["instruction"], "output": r["output"]} for r in read("extraction")]
    qa = [{"instruction": f"Answer with a short phrase copied from the text. {r['instruction']}",
           "input": r["input"], "output": r["output"]} for r in read("question_answering")]
    headlines = read("summarization")
    return extraction, qa, headlines


def make_records(n, split, seed):
    """n Alpaca records, ~20 to ~500 tokens: many short ones (arithmetic, word tasks), a middle of single-text tasks
    and a long tail that asks about several texts at once, as instruction sets (Alpaca, Dolly) are spread."""
    rng = random.Random(f"{seed}-{split}")
    extraction, qa, headlines = example_records(split)
    words = sorted({w.strip(".,").lower() for r in headlines for w in r["input"].split() if w.isalpha() and len(w) > 3})

    def arithmetic():
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}

    def word_task():
        picked = rng.sample(words, rng.randint(3, 8))
        return {"instruction": "Sort these words alphabetically.", "input": ", ".join(picked),
                "output": ", ".join(sorted(picked))}

    def many_headlines():
        stories = rng.sample(headlines, rng.randint(2, 5))
        return {"instruction": "Write a one-line headline for each story, numbered as the stories are.",
                "input": "\n\n".join(f"Story {i}: {s['input']}" for i, s in enumerate(stories, 1)),
                "output": "\n".join(f"{i}. {s['output']}" for i, s in enumerate(stories, 1))}

    def long_qa():
        texts = rng.sample(qa, rng.randint(2, 6))
        asked = rng.choice(texts)
        return {"instruction": asked["instruction"], "input": "\n\n".join(t["input"] for t in texts),
                "output": asked["output"]}

    kinds = [(arithmetic, 20), (word_task, 12), (lambda: rng.choice(extraction), 20), (lambda: rng.choice(qa), 18),
             (lambda: rng.choice(headlines), 12), (long_qa, 9), (many_headlines, 9)]
    makers, weights = zip(*kinds)
    return [rng.choices(makers, weights)[0]() for _ in range(n)]


def write_data(folder):
    paths = {"train": os.path.join(folder, "train.json"), "validation": os.path.join(folder, "validation.json"),
             "prompt_format": os.path.join(folder, "prompt_format.txt"),
             "target_modules": os.path.join(folder, "target_modules.txt")}
    read = args.steps * args.batch_size * args.gradient_accumulation_steps
    for split, n in (("train", args.train_examples or max(1000, 4 * read)), ("validation", args.validation_examples)):
        with open(paths[split], "w", encoding="utf-8") as f:
            json.dump(make_records(n, split, args.seed), f)
    Path(paths["prompt_format"]).write_text(PROMPT_FORMAT, encoding="utf-8")
    Path(paths["target_modules"]).write_text(LORA["target_modules"] + "\n", encoding="utf-8")
    return paths


def encode(path, tokenizer, max_length):
    """Token ids and masked labels exactly as lora finetune makes them: every run trains on the same ids."""
    return load_examples(path, tokenizer, max_length, data_format="alpaca", prompt_format=PROMPT_FORMAT)[0]


# ------------------------------------------------------------------- one run, in its own process
class Probe:
    """What a run trained on and when: tokens of each training batch, the time of each optimizer step."""

    def __init__(self):
        self.start, self.rss_before, self.real, self.target, self.step_times = None, None, 0, 0, []
        register_optimizer_step_post_hook(lambda *_: self.step_times.append((time.perf_counter(), time.process_time())))

    def batch(self, real, target):
        if self.start is None:
            self.start = (time.perf_counter(), time.process_time())
            with open("/proc/self/statm") as f:
                self.rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        self.real += real
        self.target += target

    def result(self, **extra):
        return {"real_tokens": self.real, "target_tokens": self.target, "steps": len(self.step_times),
                "train_s": self.step_times[-1][0] - self.start[0], "train_cpu_s": self.step_times[-1][1] - self.start[1],
                "rss_before": self.rss_before, **extra}


def run_ours(probe, paths, out, options):
    """lora finetune in this process. Collation is counted where training calls it (grad on, not validation)."""
    import lora.data

    collate = lora.data.collate

    def counting_collate(examples, *a, **kw):
        batch = collate(examples, *a, **kw)
        if torch.is_grad_enabled():
            probe.batch(sum(len(e["input_ids"]) for e in examples), int((batch["labels"] != IGNORE_INDEX).sum()))
        return batch
    for module in [m for name, m in sys.modules.items() if name.startswith("lora.")]:
        if getattr(module, "collate", None) is collate:
            module.collate = counting_collate
    final = lora.finetune(lora.finetune_args(
        model_name_or_path=args.model, target_modules_path=paths["target_modules"],
        prompt_format_path=paths["prompt_format"], train_data_path=paths["train"], checkpoint_dir=out,
        seed=args.seed, lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        batch_size=options["batch_size"], gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, lr_scheduler="linear", max_steps=options["steps"],
        max_seq_length=options["max_seq_length"], max_grad_norm=args.max_grad_norm, evaluate=False,
        device="cpu", packing=options.get("packing", False), group_by_length=options.get("group", False),
        gradient_checkpointing=options.get("gradient_checkpointing", False)))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    return probe.result(adapter=final, losses=losses)


def run_peer(probe, paths, out, options, name):
    """PEFT + Trainer (padded) or PEFT + TRL's SFTTrainer (packed), on the ids lora finetune trains on."""
    import peft
    import transformers
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    model, tokenizer = lora.load_model(args.model)
    tokenizer.pad_token_id = pad_token_id(tokenizer)
    examples = encode(paths["train"], tokenizer, options["max_seq_length"])
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM"))
    common = dict(output_dir=out, per_device_train_batch_size=options["batch_size"],
                  gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=options["steps"],
                  learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  optim="adamw_torch", max_grad_norm=args.max_grad_norm, logging_steps=1, save_strategy="no",
                  eval_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True, use_cpu=True,
                  dataloader_num_workers=0)

    def counting(trainer_class):
        class Counting(trainer_class):
            def compute_loss(self, model, inputs, *a, **kw):
                if model.training:
                    mask = inputs.get("attention_mask")  # none in TRL's padding-free rows: every token is real
                    probe.batch(int(mask.sum()) if mask is not None else inputs["input_ids"].numel(),
                                int((inputs["labels"] != IGNORE_INDEX).sum()))
                return super().compute_loss(model, inputs, *a, **kw)
        return Counting

    if name.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, packing=True, packing_strategy="bfd", max_length=options["max_seq_length"],
                           gradient_checkpointing=False, bf16=False)  # SFTConfig defaults both on; nobody else uses them
        trainer = counting(SFTTrainer)(model=model, args=config, processing_class=tokenizer,
                                       train_dataset=Dataset.from_list(examples))
    else:
        config = TrainingArguments(**common, train_sampling_strategy="group_by_length" if options.get("group") else "random")
        trainer = counting(Trainer)(model=model, args=config, train_dataset=examples,
                                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                                         label_pad_token_id=IGNORE_INDEX))
    trainer.train()
    adapter = os.path.join(out, "final")
    model.save_pretrained(adapter)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return probe.result(adapter=adapter, losses=losses)


def child():
    torch.manual_seed(args.seed)
    paths, options = json.loads(args.data), json.loads(args.child_options)
    probe = Probe()
    if args.child.startswith("ours"):
        result = run_ours(probe, paths, args.out, options)
    else:
        result = run_peer(probe, paths, args.out, options, args.child)
    Path(args.out, "result.json").write_text(json.dumps(result))


# ------------------------------------------------------------------- the parent: data, turns, tables
def spawn(name, paths, folder, options, tag):
    """Run one training run in a fresh process; its own peak RSS comes from os.wait4."""
    out = os.path.join(folder, tag)
    os.makedirs(out)
    argv = [sys.executable, __file__, "--child", name, "--data", json.dumps(paths), "--out", out,
            "--child_options", json.dumps(options)] + sys.argv[1:]
    started = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = Path(out, "log.txt").read_text(errors="replace").strip().splitlines()[-15:]
        sys.exit(f"run {tag} failed (exit {proc.returncode}); the end of its log:\n" + "\n".join(tail))
    result = json.loads(Path(out, "result.json").read_text())
    result.update(peak_rss=usage.ru_maxrss * 1024, wall_s=time.perf_counter() - started)
    print(f"  {tag}: {result['steps']} steps, {result['real_tokens'] / result['train_s']:.0f} real tok/s, "
          f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB, run {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


@torch.no_grad()
def validation_loss(adapter, examples):
    """Token-weighted mean loss over the validation set, one example at a time (no padding), for any run's adapter."""
    model, _ = lora.load_model(args.model)
    lora.load_adapter(model, adapter)
    total, tokens = 0.0, 0
    for e in examples:
        labels = torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += model(input_ids=torch.tensor([e["input_ids"]]), labels=labels).loss.item() * n
        tokens += n
    return total / tokens


def lora_parameters(adapter):
    return sum(m.A.numel() + m.B.numel() for m in lora.read_adapter(adapter).modules.values())


def percentiles(values, qs=(0, 10, 50, 90, 100)):
    values = sorted(values)
    return [values[min(len(values) - 1, q * len(values) // 100)] for q in qs]


def missing_peers(names):
    """Runs whose software is not installed here, with the reason."""
    missing = {}
    for name in names:
        module = "trl" if name.startswith("trl") else "peft" if name.startswith("peft") else None
        try:
            module and __import__(module)
        except ImportError:
            missing[name] = f"{module} is not installed (pip install -e '.[bench]')"
    return missing


def parent():
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    skipped = missing_peers(names)
    names = [n for n in names if n not in skipped]
    started, load_before = time.perf_counter(), load_average()
    resolve_model_path(args.model)  # the default model's one-time conversion, before anything is timed
    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        paths = write_data(folder)
        train, validation = (encode(paths[s], tokenizer, args.max_seq_length) for s in ("train", "validation"))
        lengths = [len(e["input_ids"]) for e in train]
        mean = sum(lengths) / len(lengths)
        rows = args.packed_batch_size or max(1, round(args.batch_size * mean / args.max_seq_length))
        print(f"data: {len(train)} training examples, tokens min/p10/median/p90/max "
              f"{'/'.join(map(str, percentiles(lengths)))}, mean {mean:.0f}; {len(validation)} validation examples. "
              f"Padded batches: {args.batch_size} examples; packed: {rows} row(s) of {args.max_seq_length}",
              file=sys.stderr)
        options = {n: {"batch_size": rows if "packing" in n else args.batch_size, "steps": args.steps,
                       "max_seq_length": args.max_seq_length, "packing": "packing" in n, "group": "group" in n}
                   for n in names}
        results = {n: [] for n in names}
        for repeat in range(args.repeats):
            for n in names:
                results[n].append(spawn(n, paths, folder, options[n], f"{n}-{repeat + 1}"))
        memory = {}
        if args.memory_pair:
            for gc in (False, True):
                memory[gc] = spawn("ours-packing", paths, folder, {
                    "batch_size": 1, "steps": args.memory_steps, "max_seq_length": args.memory_seq_length,
                    "packing": True, "gradient_checkpointing": gc}, f"memory-{'gc' if gc else 'plain'}")
        load_after = load_average()
        print("validation loss of each run's adapter ...", file=sys.stderr)
        val = {n: validation_loss(results[n][0]["adapter"], validation) for n in names}
        params = {n: lora_parameters(results[n][0]["adapter"]) for n in names}
    if args.save:
        Path(args.save).write_text(json.dumps({"args": vars(args), "runs": results, "validation_loss": val,
                                               "gradient_checkpointing_pair": list(memory.values())}, indent=1))
    report(names, results, val, params, memory, rows, skipped, mean, lengths, load_before, load_after,
           time.perf_counter() - started)


def report(names, results, val, params, memory, rows, skipped, mean, lengths, load_before, load_after, seconds):
    def best(n, key, per="train_s"):
        return max(r[key] / r[per] for r in results[n])

    def rss(n):
        return max(r["peak_rss"] for r in results[n])

    def train_loss(n):
        tail = results[n][0]["losses"][-5:]
        return sum(tail) / len(tail)
    ref = "peft" if "peft" in names else None
    print(f"\n{args.steps} optimizer steps per run, {args.repeats} repeats; padded batch {args.batch_size} examples, "
          f"packed batch {rows} row(s) of {args.max_seq_length} tokens; gradient accumulation "
          f"{args.gradient_accumulation_steps}; lr {args.learning_rate} linear; float32; {args.threads} torch threads.\n")
    print("| run | real tok/s | target tok/s | real tok/CPU-s | tokens trained | peak RSS | train loss | val loss |"
          + (" tok/s vs PEFT | RSS vs PEFT |" if ref else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ref else ""))
    for n in names:
        line = (f"| {RUNS[n]} | {best(n, 'real_tokens'):.0f} | {best(n, 'target_tokens'):.0f} | "
                f"{best(n, 'real_tokens', 'train_cpu_s'):.0f} | {results[n][0]['real_tokens']:,} | "
                f"{rss(n) / 2**30:.2f} GiB | {train_loss(n):.4f} | {val[n]:.4f} |")
        if ref:
            line += f" {best(n, 'real_tokens') / best(ref, 'real_tokens'):.2f}x | {rss(n) / rss(ref):.2f}x |"
        print(line)
    print()
    same_params = len(set(params.values())) == 1
    print("- LoRA parameters trained: " + (f"{next(iter(params.values())):,} in every run" if same_params else
                                             ", ".join(f"{RUNS[n]} {params[n]:,}" for n in names)))
    for n in names:
        losses = [r["losses"] for r in results[n]]
        if any(curve != losses[0] for curve in losses):
            print(f"- {RUNS[n]}: the repeats' loss curves differ (not deterministic on this machine)")
        if any(r["steps"] != args.steps for r in results[n]):
            print(f"- {RUNS[n]}: ran {[r['steps'] for r in results[n]]} optimizer steps, not {args.steps}")
    for n, why in skipped.items():
        print(f"- {RUNS[n]}: not run, {why}")
    if memory:
        plain, gc = memory[False], memory[True]
        cut = 1 - gc["peak_rss"] / plain["peak_rss"]
        grown = [m["peak_rss"] - m["rss_before"] for m in (plain, gc)]
        print(f"\nGradient checkpointing, lora finetune --packing --max_seq_length {args.memory_seq_length}, 1 row a "
              f"batch, {args.memory_steps} steps:\n")
        print("| --gradient_checkpointing | peak RSS | growth during training | real tok/s | real tok/CPU-s |")
        print("|---|---:|---:|---:|---:|")
        for label, m, g in (("off", plain, grown[0]), ("on", gc, grown[1])):
            print(f"| {label} | {m['peak_rss'] / 2**30:.2f} GiB | {g / 2**30:.2f} GiB | "
                  f"{m['real_tokens'] / m['train_s']:.0f} | {m['real_tokens'] / m['train_cpu_s']:.0f} |")
        print(f"\n- peak RSS {100 * cut:.0f}% lower with it (growth over the RSS before the first step: "
              f"{100 * (1 - grown[1] / grown[0]):.0f}% lower)")
    print("\nGoals:")
    def speedup(n):
        """Real tokens per second and per CPU-second, relative to PEFT + Trainer."""
        return (best(n, "real_tokens") / best(ref, "real_tokens"),
                best(n, "real_tokens", "train_cpu_s") / best(ref, "real_tokens", "train_cpu_s"))
    if ref and "ours-packing" in names:
        (speed, cpu), gap = speedup("ours-packing"), val["ours-packing"] / val[ref] - 1
        print(f"- --packing at least 1.5x PEFT + Trainer's real tokens/s: {speed:.2f}x ({cpu:.2f}x per CPU-second), "
              f"{'met' if speed >= 1.5 else 'NOT met'}")
        print(f"- its validation loss within 2% of PEFT + Trainer's at equal steps: {100 * gap:+.1f}%, "
              f"{'met' if gap <= 0.02 else 'NOT met'}")
    if ref and "ours" in names:
        speed, cpu = speedup("ours")
        print(f"- without packing no slower than PEFT + Trainer: {speed:.2f}x ({cpu:.2f}x per CPU-second), "
              f"{'met' if speed >= 1 else 'NOT met'}")
    if memory:
        print(f"- --gradient_checkpointing cuts peak memory at --max_seq_length {args.memory_seq_length} by at least "
              f"30%: {100 * cut:.0f}%, {'met' if cut >= 0.3 else 'NOT met'}")
    import transformers
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    for module in ("peft", "trl"):
        try:
            versions += f", {module} {__import__(module).__version__}"
        except ImportError:
            pass
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}; {versions}. Data: "
          f"{len(lengths)} generated Alpaca examples, {min(lengths)} to {max(lengths)} tokens (mean {mean:.0f}). "
          f"Load average (1/5/15 min) before {load_before}, after {load_after}. Whole run: {seconds / 60:.1f} min.")


if __name__ == "__main__":
    torch.set_num_threads(args.threads)
    child() if args.child else parent()
