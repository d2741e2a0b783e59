"""`lora generate`: one answer from a task adapter (or the base model)."""
import argparse

from .common import add_model_arguments, load_multitask, prompt_format_for, task_or_base


def run(args: argparse.Namespace) -> None:
    mt = load_multitask(args)
    task = task_or_base(args.task)
    settings = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    fmt = prompt_format_for(mt, task, args.prompt_format_path)[0]
    if fmt is not None:
        settings["prompt_format"] = fmt
    print(mt.generate_response(task, args.instruction, args.input, **settings))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(p)
    p.add_argument("--task", help="task name from the mapper; omit or 'base' for the base model")
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default="", help="the optional context the instruction is about")
    return p
