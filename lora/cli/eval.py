"""`lora eval`: score a task adapter (or the base model) on a test set."""
import argparse
import json
import os
import sys

from ..errors import LoraError
from ..evaluate import METRICS, evaluate, task_schema
from ..harness import evaluate_with_lm_eval
from .common import add_model_arguments, load_multitask, positive_int, prompt_format_for, task_or_base


def run(args: argparse.Namespace) -> None:
    task = task_or_base(args.task)
    if args.lm_eval:
        return run_lm_eval(args, task)
    if not args.test_data_path:
        raise LoraError("give --test_data_path (an Alpaca test set), or --lm-eval TASKS")
    prompt_format_path = args.prompt_format_path
    beside_data = os.path.join(os.path.dirname(args.test_data_path), "prompt_format.txt")
    if task is None and not prompt_format_path and os.path.exists(beside_data):
        prompt_format_path = beside_data  # a task folder's own prompt: the base model is judged on the same prompt
    mt = load_multitask(args)
    prompt_format, how = prompt_format_for(mt, task, prompt_format_path)
    result = evaluate(mt, task, args.test_data_path, args.metric, args.batch_size, args.max_new_tokens, prompt_format,
                      constrained=args.constrained)
    schema = "with its response_schema" if result["constrained"] else \
        "without its response_schema" if task_schema(mt, task) else "unconstrained"
    print(f"{result['task']}: {args.metric} {result['score']:.3f} on {result['n']} examples of {args.test_data_path} "
          f"({how}, {schema}, {result['seconds']:.0f} s)")
    if args.output:
        write_json(args.output, {"model": args.model, "test_data_path": args.test_data_path, **result})


def run_lm_eval(args: argparse.Namespace, task: str | None) -> None:
    """`--lm-eval TASKS`: lm-evaluation-harness's local-completions against `lora serve` (see lora.harness)."""
    names = [name for name in args.lm_eval.split(",") if name]
    mt = load_multitask(args)
    result = evaluate_with_lm_eval(mt, task, names, base_url=args.base_url, limit=args.limit)
    for name, metrics in result["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{result['task']}: lm-eval {name}: {shown}")
    if args.output:
        write_json(args.output, {"model": args.model, "lm_eval": names, **result})


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False, default=str)
    print(f"Wrote results to {path}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(p, base_prompt="prompt_format.txt beside the test data, else its chat template")
    p.add_argument("--task", help="task name from the mapper; omit or 'base' for the base model")
    p.add_argument("--test_data_path", "--data", help="Alpaca-format JSON list or JSONL with outputs")
    p.add_argument("--metric", default="exact_match", choices=list(METRICS))
    p.add_argument("--batch_size", "--batch-size", type=positive_int, default=16)
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True,
                   help="answers follow the task's response_schema (lora_task.json), as served; --no-constrained "
                        "scores its free answers, to see what the schema adds")
    p.add_argument("--output", help="write score and every prediction to this JSON file")
    p.add_argument("--lm-eval", "--lm_eval", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks (names, or Alpaca test set files, scored by "
                        "loglikelihood) run with lm-eval's local-completions against lora serve, offline")
    p.add_argument("--base-url", "--base_url", help="with --lm-eval: a running lora serve (default: one started here)")
    p.add_argument("--limit", type=positive_int, help="with --lm-eval: documents per task")
    return p
