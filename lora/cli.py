"""The `lora` command: finetune, eval, generate, chat, serve."""
import argparse
import os
import sys

from .distributed import launched_by_torchrun
from .errors import LoraError


def cmd_finetune(args):
    from .train import finetune

    finetune(args)


def launch_finetune(args, argv):
    """`lora finetune --nproc_per_node N`: check the flags here, then let torchrun start N processes."""
    from . import distributed
    from .train import check_arguments

    check_arguments(args)
    return distributed.launch(args.nproc_per_node, argv)


def cmd_serve(args):
    try:
        from .serve import create_app, run
    except ImportError as e:
        raise LoraError(f"lora serve needs the serve extra ({e.name} is missing): "
                        "pip install 'lora-pytorch[serve]'") from None
    from .multitask import MultiTaskModel
    from .engine import Engine

    for flag, value, least in (("--max-num-seqs", args.max_num_seqs, 1), ("--max-tokens-cap", args.max_tokens_cap, 1),
                               ("--max-prompts", args.max_prompts, 1), ("--max-model-len", args.max_model_len, 2),
                               ("--max-waiting", args.max_waiting, 0), ("--kv-cache-bytes", args.kv_cache_bytes, 1),
                               ("--max-num-batched-tokens", args.max_num_batched_tokens, 1)):
        if value is not None and value < least:
            raise LoraError(f"{flag} must be at least {least}, got {value}")
    if args.adapter_root and not os.path.isdir(args.adapter_root):
        raise LoraError(f"--adapter-root {args.adapter_root} is not a folder")
    mt = MultiTaskModel(args.model, args.mapper, device=args.device, dtype=args.dtype)
    settings = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len, "max_waiting": args.max_waiting,
                "kv_cache_bytes": args.kv_cache_bytes, "max_prefill_tokens": args.max_num_batched_tokens}
    engine = Engine(mt, **{k: v for k, v in settings.items() if v is not None})  # unset: the engine's defaults
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(mt, engine, served_model_name=name, adapter_root=args.adapter_root,
                     api_key=args.api_key or None, max_tokens_cap=args.max_tokens_cap,
                     max_prompts=args.max_prompts or args.max_num_seqs, context_length=args.max_model_len)
    print(f"Serving {name} with tasks: {', '.join(mt.downstreams) or 'none'}", file=sys.stderr)
    run(app, args.host, args.port)


def add_serve_arguments(p):
    p.add_argument("--model", default="smollm2-135m", help="local HF model folder, or smollm2-135m")
    p.add_argument("--served-model-name", help="the base model's id in /v1/models (default: the model folder's name)")
    p.add_argument("--mapper", help="JSON file {task: checkpoint dir}, or a folder of checkpoints")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--adapter-root", help="the folder /v1/load_lora_adapter may load from (default: loading is off)")
    p.add_argument("--api-key", default=os.environ.get("LORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $LORA_API_KEY)")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="the most tokens one request may ask for")
    p.add_argument("--max-prompts", type=int, help="the most prompts x n in one request (default: --max-num-seqs)")
    p.add_argument("--max-num-seqs", "--max-batch-size", type=int, default=16,
                   help="the most requests the engine runs together")
    p.add_argument("--max-model-len", type=int,
                   help="prompt plus completion tokens per request (default: the model's context, at most 4096)")
    p.add_argument("--kv-cache-bytes", type=int, help="the KV cache's size in bytes (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="prompt tokens prefilled per engine step; longer prompts are split over steps")
    p.add_argument("--max-waiting", type=int,
                   help="requests that may wait for the engine (default: the engine's); past it, 429 with Retry-After")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    return p


# ---------------------------------------------------------------- eval, generate, chat

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(p, base_prompt="the model's chat template around '{instruction}\\n\\n{input}'"):
    p.add_argument("--model", default="smollm2-135m", help="local HF model folder, or smollm2-135m")
    p.add_argument("--mapper", help="JSON file {task: checkpoint dir}, or a folder of checkpoints")
    p.add_argument("--prompt_format_path", "--prompt-format-path",
                   help=f"prompt format file (default: the task adapter's own; for the base model {base_prompt})")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=positive_int, help="longest answer, in tokens")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    return p


def load_multitask(args):
    from .multitask import MultiTaskModel

    return MultiTaskModel(args.model, args.mapper, device=args.device, dtype=args.dtype)


def task_or_base(name):
    return None if name in (None, "", "base") else name


def base_prompt_format(tokenizer):
    """The model's own chat template around '{instruction}\n\n{input}': how an instruct model expects a question.

    None when the tokenizer has no chat template (then MultiTaskModel's plain default applies).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": "{instruction}\n\n{input}"}],
                                         add_generation_prompt=True, tokenize=False)


def prompt_format_for(mt, task, path=None):
    """(prompt format or None, where it comes from): the file at `path`, else the adapter's, else the base model's."""
    from .data import load_prompt_format

    if path:
        return load_prompt_format(path), f"prompt format {path}"
    if task is not None:
        return None, "the adapter's prompt format"
    fmt = base_prompt_format(mt.tokenizer)
    return fmt, "the model's chat template" if fmt else "the plain default prompt format"


def cmd_eval(args):
    import json

    from .evaluate import evaluate

    task = task_or_base(args.task)
    prompt_format_path = args.prompt_format_path
    beside_data = os.path.join(os.path.dirname(args.test_data_path), "prompt_format.txt")
    if task is None and not prompt_format_path and os.path.exists(beside_data):
        prompt_format_path = beside_data  # a task folder's own prompt: the base model is judged on the same prompt
    mt = load_multitask(args)
    prompt_format, how = prompt_format_for(mt, task, prompt_format_path)
    result = evaluate(mt, task, args.test_data_path, args.metric, args.batch_size, args.max_new_tokens, prompt_format)
    print(f"{result['task']}: {args.metric} {result['score']:.3f} on {result['n']} examples of {args.test_data_path} "
          f"({how}, {result['seconds']:.0f} s)")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "test_data_path": args.test_data_path, **result}, f, indent=2,
                      ensure_ascii=False)
        print(f"Wrote predictions to {args.output}", file=sys.stderr)


def add_eval_arguments(p):
    from .evaluate import METRICS

    add_model_arguments(p, base_prompt="prompt_format.txt beside the test data, else its chat template")
    p.add_argument("--task", help="task name from the mapper; omit or 'base' for the base model")
    p.add_argument("--test_data_path", "--data", required=True, help="Alpaca-format JSON list or JSONL with outputs")
    p.add_argument("--metric", default="exact_match", choices=list(METRICS))
    p.add_argument("--batch_size", "--batch-size", type=positive_int, default=16)
    p.add_argument("--output", help="write score and every prediction to this JSON file")
    return p


def cmd_generate(args):
    mt = load_multitask(args)
    task = task_or_base(args.task)
    settings = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    fmt = prompt_format_for(mt, task, args.prompt_format_path)[0]
    if fmt is not None:
        settings["prompt_format"] = fmt
    print(mt.generate_response(task, args.instruction, args.input, **settings))


def add_generate_arguments(p):
    add_model_arguments(p)
    p.add_argument("--task", help="task name from the mapper; omit or 'base' for the base model")
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default="", help="the optional context the instruction is about")
    return p


CHAT_HELP = "/task NAME switches task (base: no adapter), /tasks lists them, /input TEXT sets the input " \
            "the next questions are about (/input alone clears it), /quit exits"


def chat(mt, lines, task=None, prompt_format=None, max_new_tokens=None):
    """The chat loop over an iterable of lines (stdin, or a list in tests); everything it says goes to stdout.

    `prompt_format` applies to every task; without it a task uses its adapter's and the base model its own.
    """
    import time

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


def prompted_lines(prompt="> "):
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def cmd_chat(args):
    from .data import load_prompt_format

    prompt_format = load_prompt_format(args.prompt_format_path) if args.prompt_format_path else None
    mt = load_multitask(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Tasks: base {' '.join(mt.downstreams)}. {CHAT_HELP}.")
    chat(mt, prompted_lines() if interactive else sys.stdin, task_or_base(args.task), prompt_format, args.max_new_tokens)


def add_chat_arguments(p):
    add_model_arguments(p)
    p.add_argument("--task", help="task to start with (default: the base model)")
    return p


def build_parser():
    from .train import add_arguments

    parser = argparse.ArgumentParser(prog="lora", description="LoRA finetuning and multi-task serving")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="train one LoRA adapter (Alpaca or chat data, one or more processes)")
    add_arguments(p).set_defaults(func=cmd_finetune)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many task adapters")
    add_serve_arguments(p).set_defaults(func=cmd_serve)
    p = sub.add_parser("eval", help="score a task adapter (or the base model) on a test set")
    add_eval_arguments(p).set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="one answer from a task adapter (or the base model)")
    add_generate_arguments(p).set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive prompt; /task NAME switches tasks")
    add_chat_arguments(p).set_defaults(func=cmd_chat)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the subcommand
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finetune" and args.nproc_per_node > 1 and not launched_by_torchrun():
            return launch_finetune(args, argv + ["--debug"] * debug)
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
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, LoraError):  # bad input fails every process alike: say it once
            print(f"error: {message}" if rank == "0" else f"error (process {rank}): {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
