"""The `lora` command: parse the subcommand, run it, and turn any failure into one readable line."""
import argparse
import os
import sys

from ..distributed import launched_by_torchrun
from ..errors import LoraError
from . import chat, eval, export, finetune, generate, serve

COMMANDS = {  # name: (module with add_arguments and run, help)
    "finetune": (finetune, "train one LoRA adapter (Alpaca or chat data, one or more processes)"),
    "serve": (serve, "OpenAI-compatible HTTP server: one base model, many task adapters"),
    "eval": (eval, "score a task adapter (or the base model) on a test set"),
    "generate": (generate, "one answer from a task adapter (or the base model)"),
    "chat": (chat, "interactive prompt; /task NAME switches tasks"),
    "export": (export, "a task adapter for llama.cpp or Ollama (GGUF), or merged into a plain model folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora", description="LoRA finetuning and multi-task serving")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the subcommand
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finetune" and args.nproc_per_node > 1 and not launched_by_torchrun():
            return finetune.launch(args, argv + ["--debug"] * debug)
        COMMANDS[args.command][0].run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; completed checkpoints are intact", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line unless --debug
        if debug:
            raise
        message = e if isinstance(e, LoraError) else f"{type(e).__name__}: {e} (run with --debug for the traceback)"
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, LoraError):  # bad input fails every process alike: say it once
            print(f"error: {message}" if rank == "0" else f"error (process {rank}): {message}", file=sys.stderr)
        return 2
    return 0
