"""The `lora` command: finetune, eval, generate, chat, serve."""
import argparse
import sys

from .errors import LoraError


def cmd_finetune(args):
    from .train import finetune

    finetune(args)


def build_parser():
    from .train import add_arguments

    parser = argparse.ArgumentParser(prog="lora", description="LoRA finetuning and multi-task serving")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="train one LoRA adapter on Alpaca-format data")
    add_arguments(p).set_defaults(func=cmd_finetune)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the subcommand
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; completed checkpoints are intact", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line unless --debug
        if debug:
            raise
        message = str(e) if isinstance(e, LoraError) else f"{type(e).__name__}: {e} (run with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
