"""`make demo`: three LoRA task adapters on SmolLM2-135M-Instruct, trained, scored and served from one model.

1. finetune one adapter per task (examples/<task>/) into runs/demo/<task>/ with the seed's finetune command,
   each from another data format: question_answering from the Alpaca files and their prompt format,
   summarization from OpenAI `messages` and extraction from ShareGPT `conversations` (written to
   runs/demo/data/ from the same records), both through the model's chat template;
2. score the base model and each adapter on the task's test.json (what `lora eval` does);
3. load all three into one MultiTaskModel and answer test examples in interleaved task order, timing switches;
4. export each adapter for Ollama (runs/demo/ollama/<task>/: the llama.cpp adapter GGUF and a Modelfile);
5. write runs/demo/report.md, loss.png and metrics.png.

`--quantize nf4` (or fp4, int8) runs QLoRA's side of the comparison instead: the same training with the
same seed and steps on a base whose linear layers are quantized, into runs/demo-nf4/, each adapter scored
on that quantized base (what a QLoRA user serves), and runs/demo-nf4/quality.md setting its scores and
validation losses beside the float32 demo's (runs/demo/, or --compare; run `make demo` first).

Re-running reuses finished adapters (runs/demo/<task>/final) unless --force; an interrupted run resumes
from its newest complete checkpoint.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXAMPLES)
sys.path.insert(0, ROOT)  # run from a checkout without installing

from examples.report import METRIC_NAMES, write_report  # noqa: E402
from lora import DEFAULT_MODEL, MultiTaskModel, export_ollama, load_model  # noqa: E402
from lora.checkpoint import adapter_size_bytes, load_training_state  # noqa: E402
from lora.cli import main as lora_cli  # noqa: E402
from lora.data import load_prompt_format, load_records  # noqa: E402
from lora.evaluate import METRICS, evaluate, json_valid, task_schema  # noqa: E402
from lora.metrics import read_metrics, validation_rows  # noqa: E402
from lora.models import resolve_model_path  # noqa: E402
from lora.prompts import user_content  # noqa: E402

RUN_DIR = os.path.join(ROOT, "runs", "demo")
MAPPER = os.path.join(EXAMPLES, "downstream_checkpoint_mapper.json")  # task -> runs/demo/<task>/final
TASKS = {"question_answering": "exact_match", "summarization": "rouge_l", "extraction": "exact_match"}
DATA_FORMATS = {"question_answering": "alpaca", "summarization": "messages", "extraction": "sharegpt"}
SYSTEM_PROMPT = "You are a helpful assistant."  # as in the tasks' prompt_format.txt
# Sized for 2 CPU cores: 16 steps of 8 examples per task (128 of the 320 training examples, each seen once) at
# a high learning rate. These tasks are mostly about the answer's form, which LoRA on every linear layer picks
# up from about a hundred examples; on a faster machine raise --max_steps. Every 8 steps: a validation loss
# and a checkpoint, which an interrupted run resumes from.
TRAINING = ["--num_epochs", "1", "--max_steps", "16", "--eval_steps", "8", "--save_steps", "8",
            "--batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "2", "--lr_scheduler", "linear",
            "--lora_rank", "8", "--lora_alpha", "16", "--max_seq_length", "256",
            "--dtype", "float32", "--device", "cpu", "--seed", "42"]
EVAL_BATCH_SIZE = 32  # on CPU, fewer and wider batches decode faster
ROUNDS = 2  # interleaved answers per task in step 3


def task_file(task, name):
    return os.path.join(EXAMPLES, task, name)


def chat_record(record, data_format):
    """An Alpaca record as a chat: a system prompt, the user's request, the answer.

    The user message is what a request with the same instruction and input becomes at generation time
    (lora.prompts.user_content), so the adapter is asked exactly as it was trained.
    """
    turns = [("system", SYSTEM_PROMPT), ("user", user_content(record["instruction"], record["input"])),
             ("assistant", record["output"])]
    if data_format == "messages":
        return {"messages": [{"role": role, "content": text} for role, text in turns]}
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": sharegpt_roles[role], "value": text} for role, text in turns]}


def chat_file(task, split, data_format):
    """runs/demo/data/<task>/<split>.jsonl: the task's Alpaca split as chat data."""
    path = os.path.join(RUN_DIR, "data", task, f"{split}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in load_records(task_file(task, f"{split}.json")):
            f.write(json.dumps(chat_record(record, data_format), ensure_ascii=False) + "\n")
    return path


def data_arguments(task):
    """finetune's data flags: the Alpaca files and prompt format, or the same records as chat data."""
    data_format = DATA_FORMATS[task]
    if data_format == "alpaca":
        return ["--prompt_format_path", task_file(task, "prompt_format.txt"),
                "--train_data_path", task_file(task, "train.json"),
                "--validation_data_path", task_file(task, "validation.json")]
    return ["--data_format", data_format, "--train_data_path", chat_file(task, "train", data_format),
            "--validation_data_path", chat_file(task, "validation", data_format)]


def newest_checkpoint(run_dir):
    """The epoch-N/ or step-K/ checkpoint of an interrupted run with the most optimizer steps, or None.

    On a tie the epoch checkpoint wins: it was saved after that epoch's validation, so nothing is redone.
    """
    candidates = []
    for entry in os.scandir(run_dir) if os.path.isdir(run_dir) else ():
        if entry.is_dir() and entry.name.startswith(("epoch-", "step-")):
            state = load_training_state(entry.path)
            if state is not None:
                candidates.append((int(state["step"]), entry.name.startswith("epoch-"), entry.path))
    return max(candidates)[-1] if candidates else None


def finetune(task, force, extra=()):
    """Train the task's adapter unless it exists; returns the seconds spent training (None: reused)."""
    run_dir = os.path.join(RUN_DIR, task)
    if force:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif os.path.isdir(os.path.join(run_dir, "final")):
        print(f"{task}: reusing {os.path.relpath(run_dir, ROOT)}/final (make demo FORCE=1 retrains)")
        return None
    argv = ["finetune", "--model_name_or_path", DEFAULT_MODEL,
            "--target_modules_path", task_file(task, "target_modules.txt"), *data_arguments(task),
            "--checkpoint_dir", run_dir, *TRAINING, *extra]
    if os.path.exists(task_file(task, "schema.json")):  # extraction: every answer follows its schema when served
        argv += ["--response_schema", task_file(task, "schema.json")]
    resume = newest_checkpoint(run_dir)
    if resume:
        argv += ["--load_from_checkpoint", resume]
    print(f"\n$ python finetune.py {' '.join(os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in argv[1:])}")
    started = time.perf_counter()
    code = lora_cli(argv)
    if code:
        sys.exit(code)
    return time.perf_counter() - started


def score(mt, task, prompt_format):
    """Base model and adapter on the task's test set, the base model with the adapter's prompt format."""
    records = load_records(task_file(task, "test.json"))
    metric = TASKS[task]
    base = evaluate(mt, None, records, metric, EVAL_BATCH_SIZE, prompt_format=prompt_format)
    tuned = evaluate(mt, task, records, metric, EVAL_BATCH_SIZE)
    print(f"{task:<20} {METRIC_NAMES[metric]:<12} base {base['score']:.2f}  ->  adapter {tuned['score']:.2f}"
          f"   ({len(records)} test examples, {base['seconds'] + tuned['seconds']:.0f} s)")
    if task_schema(mt, task) is not None:  # the adapter's answers with its response_schema (as served) and without
        free = evaluate(mt, task, records, metric, EVAL_BATCH_SIZE, constrained=False)
        tuned["structured"] = {"unconstrained_score": free["score"],
                               "parse": parse_rate(tuned), "unconstrained_parse": parse_rate(free)}
        print(f"{'':<20} {'':<12} without its schema {free['score']:.2f}; answers that parse as JSON: "
              f"{100 * parse_rate(tuned):.0f}% with it, {100 * parse_rate(free):.0f}% without")
    return base, tuned


def parse_rate(result):
    return sum(json_valid(p["prediction"]) for p in result["predictions"]) / max(result["n"], 1)


def interleaved_answers(mt):
    """Answer test examples in task order qa, summarization, extraction, qa, ...: every answer needs a switch."""
    for task in mt.downstreams:
        mt.adapter(task)  # read from disk now, so the timings below are the weight swaps alone
    switches = []
    for round_ in range(ROUNDS):
        for task in TASKS:
            record = load_records(task_file(task, "test.json"))[1 + round_]
            started = time.perf_counter()
            mt.activate(task)
            switched = time.perf_counter()
            answer = mt.generate_response(task, record["instruction"], record["input"], max_new_tokens=64)
            answered = time.perf_counter()
            switches.append({"task": task, "switch_ms": 1e3 * (switched - started), "answer_seconds": answered - switched,
                             "instruction": record["instruction"], "input": record["input"], "answer": answer,
                             "expected": record["output"]})
            print(f"\n[{task}] switch {switches[-1]['switch_ms']:.1f} ms, answer {answered - switched:.2f} s")
            if record["input"]:
                print(f"  input:    {shorten(record['input'])}")
            print(f"  ask:      {shorten(record['instruction'])}")
            exact = METRICS["exact_match"](answer, record["output"])
            print(f"  answer:   {answer}" + ("   (exact)" if exact else f"\n  expected: {record['output']}"))
    return switches


def task_summary(mt, task, base, tuned, train_seconds):
    """One task's entry in the report: scores, adapter size, training time, the first test example."""
    adapter = mt.adapter(task)
    first_base, first_tuned = base["predictions"][0], tuned["predictions"][0]
    return {"task": task, "metric": TASKS[task], "base_score": base["score"], "adapter_score": tuned["score"],
            "n": tuned["n"], "adapter_parameters": sum(m.A.numel() + m.B.numel() for m in adapter.modules.values()),
            "adapter_bytes": adapter_size_bytes(adapter.path), "train_seconds": train_seconds,
            "metrics_path": os.path.join(RUN_DIR, task, "metrics.jsonl"), "data_format": DATA_FORMATS[task],
            "structured": tuned.get("structured"),
            "example": {"instruction": first_tuned["instruction"], "input": first_tuned["input"],
                        "output": first_tuned["output"], "base": first_base["prediction"],
                        "adapter": first_tuned["prediction"]}}


def export_for_ollama(mt):
    """Each task as an Ollama folder (adapter.gguf + Modelfile): the command to run it and the adapter's size."""
    exports = []
    for task in TASKS:
        folder = export_ollama(mt.pretrained_model, mt.adapter(task), os.path.join(RUN_DIR, "ollama", task),
                               tokenizer=mt.tokenizer)
        name = f"smollm2-{task.replace('_', '-')}"
        exports.append({"task": task, "folder": folder, "command": f"ollama create {name} -f "
                        f"{os.path.relpath(folder, ROOT)}/Modelfile && ollama run {name}",
                        "adapter_gguf_bytes": os.path.getsize(os.path.join(folder, "adapter.gguf"))})
        print(f"{task:<20} {exports[-1]['adapter_gguf_bytes'] / 1e6:.1f} MB adapter.gguf   {exports[-1]['command']}")
    return exports


def quality(method, float_dir, force):
    """--quantize: the demo's training on a quantized base, each adapter scored on that base, beside float32's."""
    global RUN_DIR  # every path of the run (chat data, adapters, metrics) goes under runs/demo-<method>/
    RUN_DIR = os.path.join(ROOT, "runs", f"demo-{method}")
    reference_path = os.path.join(float_dir, "summary.json")
    if not os.path.isfile(reference_path):
        sys.exit(f"no float32 demo results at {reference_path}: run `make demo` first (or pass --compare FOLDER)")
    with open(reference_path, encoding="utf-8") as f:
        reference = {t["task"]: t for t in json.load(f)["tasks"]}
    print(f"== 1/2  Finetune one LoRA adapter per task on {DEFAULT_MODEL} quantized to {method} "
          f"({torch.get_num_threads()} CPU threads)")
    resolve_model_path(DEFAULT_MODEL)
    train_seconds = {task: finetune(task, force, ["--quantize", method]) for task in TASKS}
    print(f"\n== 2/2  Each adapter on the {method} base vs the float32 demo's adapter on the float32 base")
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    mt = MultiTaskModel(model, {task: os.path.join(RUN_DIR, task, "final") for task in TASKS}, tokenizer=tokenizer,
                        quantize=method)
    rows = []
    for task, metric in TASKS.items():
        tuned = evaluate(mt, task, load_records(task_file(task, "test.json")), metric, EVAL_BATCH_SIZE)
        losses = {row["step"]: row["val_loss"] for row in validation_rows(read_metrics(
            os.path.join(RUN_DIR, task, "metrics.jsonl")))}
        float_losses = {row["step"]: row["val_loss"] for row in validation_rows(read_metrics(
            os.path.join(float_dir, task, "metrics.jsonl")))}
        step = max(set(losses) & set(float_losses))  # the last validation both runs made: equal steps
        rows.append({"task": task, "metric": metric, "n": tuned["n"], "score": tuned["score"],
                     "float32_score": reference[task]["adapter_score"], "step": step, "val_loss": losses[step],
                     "float32_val_loss": float_losses[step], "train_seconds": train_seconds[task],
                     "float32_train_seconds": reference[task]["train_seconds"]})
        r = rows[-1]
        print(f"{task:<20} {METRIC_NAMES[metric]:<12} {method} {r['score']:.3f} vs float32 {r['float32_score']:.3f};"
              f" validation loss at step {step}: {r['val_loss']:.4f} vs {r['float32_val_loss']:.4f}")
    with open(os.path.join(RUN_DIR, "quality.json"), "w", encoding="utf-8") as f:
        json.dump({"method": method, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[2],
                   "tasks": rows}, f, indent=1)
    path = os.path.join(RUN_DIR, "quality.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(quality_table(method, rows))
    print(f"\n{quality_table(method, rows)}\nWrote {os.path.relpath(path, ROOT)}")
    return 0 if all(quality_met(r) for r in rows) else 1


def quality_met(row):
    """The goal: the score at most 0.05 below float32's and the validation loss at most 5% above it at equal
    steps (doing better than float32 is no miss)."""
    return row["score"] >= row["float32_score"] - 0.05 and row["val_loss"] <= 1.05 * row["float32_val_loss"]


def quality_table(method, rows):
    lines = [f"| task | metric | {method} base | float32 base | validation loss ({method} / float32, step) | "
             "goal |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {METRIC_NAMES[r['metric']]} | {r['score']:.3f} | {r['float32_score']:.3f} | "
                     f"{r['val_loss']:.4f} / {r['float32_val_loss']:.4f} (step {r['step']}, "
                     f"{r['val_loss'] / r['float32_val_loss'] - 1:+.1%}) | {'met' if quality_met(r) else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def shorten(text, limit=110):
    return text if len(text) <= limit else text[:limit - 1] + "…"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain every adapter from scratch")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                        help="QLoRA: train and score on a base quantized so, in runs/demo-<method>/, against float32's")
    parser.add_argument("--compare", default=RUN_DIR, help="--quantize: the float32 demo's folder (default runs/demo)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the progress bars on stderr
    if args.quantize:
        return quality(args.quantize, args.compare, args.force)
    started, cpu_started = time.perf_counter(), time.process_time()
    phases = {}

    def phase_done(name, since):
        phases[name] = time.perf_counter() - since
        return time.perf_counter()

    print(f"== 1/5  Finetune one LoRA adapter per task on {DEFAULT_MODEL} ({torch.get_num_threads()} CPU threads)")
    resolve_model_path(DEFAULT_MODEL)  # the first run turns the packaged GGUF into a model folder, once
    mark = phase_done("preparing the base model (first run only)", started)
    train_seconds = {task: finetune(task, args.force) for task in TASKS}
    mark = phase_done("training 3 adapters", mark)

    print("\n== 2/5  Base model vs adapter on each test set")
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    base_parameters = sum(p.numel() for p in model.parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mt = MultiTaskModel(model, MAPPER, tokenizer=tokenizer)
    scores = {task: score(mt, task, load_prompt_format(task_file(task, "prompt_format.txt"))) for task in TASKS}
    mark = phase_done("scoring base model and adapters", mark)

    print("\n== 3/5  One model, three tasks: interleaved answers")
    switches = interleaved_answers(mt)
    mt.activate(None)
    phase_done("interleaved answers", mark)

    print("\n== 4/5  Export each task for llama.cpp and Ollama")
    mark = time.perf_counter()
    exports = export_for_ollama(mt)
    phase_done("exporting for Ollama", mark)

    print("\n== 5/5  Report")
    tasks = [task_summary(mt, task, base, tuned, train_seconds[task]) for task, (base, tuned) in scores.items()]
    summary = {"model": DEFAULT_MODEL, "base_parameters": base_parameters, "base_bytes": base_bytes,
               "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - started,
               "phases": phases, "cpu_seconds": time.process_time() - cpu_started, "load_average": os.getloadavg()[2],
               "tasks": tasks, "switches": switches, "exports": exports}
    report = write_report(RUN_DIR, summary)
    median = statistics.median(s["switch_ms"] for s in switches)
    print(f"Median switch {median:.1f} ms. Wrote {os.path.relpath(report, ROOT)}, loss.png and metrics.png "
          f"in {os.path.relpath(RUN_DIR, ROOT)}/ ({summary['wall_seconds'] / 60:.1f} min in all)")
    losers = [t["task"] for t in tasks if t["adapter_score"] <= t["base_score"]]
    if losers:
        print(f"warning: the adapter did not beat the base model on {', '.join(losers)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
