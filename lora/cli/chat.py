"""`lora chat`: an interactive prompt that switches tasks with /task NAME."""
import argparse
import sys
import time
from collections.abc import Iterable, Iterator

from ..data import load_prompt_format
from ..errors import LoraError
from ..multitask import MultiTaskModel
from .common import add_model_arguments, base_prompt_format, load_multitask, task_or_base

CHAT_HELP = "/task NAME switches task (base: no adapter), /tasks lists them, /input TEXT sets the input " \
            "the next questions are about (/input alone clears it), /quit exits"


def chat(mt: MultiTaskModel, lines: Iterable[str], task: str | None = None, prompt_format: str | None = None,
         max_new_tokens: int | None = None) -> None:
    """The chat loop over an iterable of lines (stdin, or a list in tests); everything it says goes to stdout.

    `prompt_format` applies to every task; without it a task uses its adapter's and the base model its own.
    """
    settings = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    base_format = prompt_format or base_prompt_format(mt.tokenizer)
    context, used = "", {task}
    mt.activate(task)
    for line in lines:
        command, _, rest = line.strip().partition(" ")
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/tasks":
            print("  ".join(f"*{t}" if t == (task or "base") else t for t in ["base", *mt.downstreams]))
        elif command == "/task":
            name = task_or_base(rest.strip())
            try:
                read = time.perf_counter()
                if name is not None:
                    mt.adapter(name)  # read from disk on first use: not part of the switch
                started = time.perf_counter()
                mt.activate(name)
            except LoraError as e:
                print(f"error: {e}")
                continue
            task, done = name, time.perf_counter()
            first_use = "" if name in used else f" (read from disk first in {1e3 * (started - read):.0f} ms)"
            used.add(name)
            print(f"switched to {task or 'base'} in {1e3 * (done - started):.1f} ms{first_use}")
        elif command == "/input":
            context = rest.strip()
            words = len(context.split())
            print(f"input set ({words} word{'s' * (words != 1)})" if context else "input cleared")
        elif command.startswith("/"):
            print(f"unknown command {command}; {CHAT_HELP}")
        else:
            fmt = base_format if task is None else prompt_format
            print(mt.generate_response(task, line.strip(), context, **settings,
                                       **({"prompt_format": fmt} if fmt else {})), flush=True)


def prompted_lines(prompt: str = "> ") -> Iterator[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def run(args: argparse.Namespace) -> None:
    prompt_format = load_prompt_format(args.prompt_format_path) if args.prompt_format_path else None
    mt = load_multitask(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Tasks: base {' '.join(mt.downstreams)}. {CHAT_HELP}.")
    lines = prompted_lines() if interactive else sys.stdin
    chat(mt, lines, task_or_base(args.task), prompt_format, args.max_new_tokens)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(p)
    p.add_argument("--task", help="task to start with (default: the base model)")
    return p
