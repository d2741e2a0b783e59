"""`lora serve`: the OpenAI-compatible server over one base model and its task adapters."""
import argparse
import os
import sys

from ..engine import Engine
from ..errors import LoraError
from ..multitask import MultiTaskModel
from .common import add_quantize_arguments, quantize_settings


def run(args: argparse.Namespace) -> None:
    try:  # the serve extra is optional: say how to get it
        from ..serve import create_app
        from ..serve import run as serve
    except ImportError as e:
        raise LoraError(f"lora serve needs the serve extra ({e.name} is missing): "
                        "pip install 'lora-pytorch[serve]'") from None
    for flag, value, least in (("--max-num-seqs", args.max_num_seqs, 1), ("--max-tokens-cap", args.max_tokens_cap, 1),
                               ("--max-prompts", args.max_prompts, 1), ("--max-model-len", args.max_model_len, 2),
                               ("--max-waiting", args.max_waiting, 1), ("--kv-cache-bytes", args.kv_cache_bytes, 1),
                               ("--max-num-batched-tokens", args.max_num_batched_tokens, 1),
                               ("--max-chat-turns", args.max_chat_turns, 1),
                               ("--max-waiting-tokens", args.max_waiting_tokens, 1),
                               ("--max-loras", args.max_loras, 1), ("--block-size", args.block_size, 1),
                               ("--prefix-cache-bytes", args.prefix_cache_bytes, 1)):
        if value is not None and value < least:
            raise LoraError(f"{flag} must be at least {least}, got {value}")
    for flag, seconds in (("--shutdown-timeout", args.shutdown_timeout), ("--body-timeout", args.body_timeout)):
        if not seconds > 0:
            raise LoraError(f"{flag} must be a positive number of seconds, got {seconds}")
    if args.adapter_root and not os.path.isdir(args.adapter_root):
        raise LoraError(f"--adapter-root {args.adapter_root} is not a folder")
    mt = MultiTaskModel(args.model, args.mapper, device=args.device, dtype=args.dtype, **quantize_settings(args))
    settings = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len, "max_waiting": args.max_waiting,
                "kv_cache_bytes": args.kv_cache_bytes, "max_prefill_tokens": args.max_num_batched_tokens,
                "max_waiting_tokens": args.max_waiting_tokens, "max_loras": args.max_loras,
                "enable_prefix_caching": args.enable_prefix_caching, "block_size": args.block_size,
                "prefix_cache_bytes": args.prefix_cache_bytes, "prepack_weights": args.prepack_weights,
                # Compiling pays on a GPU; on a CPU it takes minutes of both cores (about 15 on 2) for ~1.2x decode.
                "enforce_eager": mt.device.type == "cpu" if args.enforce_eager is None else args.enforce_eager}
    engine = Engine(mt, **{k: v for k, v in settings.items() if v is not None})  # unset: the engine's defaults
    app = create_app(mt, engine, served_model_name=args.served_model_name, adapter_root=args.adapter_root,
                     api_key=args.api_key or None, max_tokens_cap=args.max_tokens_cap, max_prompts=args.max_prompts,
                     max_chat_turns=args.max_chat_turns, body_timeout=args.body_timeout)
    name = app.state.serving.models.name
    print(f"Serving {name} with tasks: {', '.join(mt.downstreams) or 'none'}", file=sys.stderr)
    serve(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2-135m", help="local HF model folder, or smollm2-135m")
    p.add_argument("--served-model-name", help="the base model's id in /v1/models (default: the model folder's name); "
                   "no task may have it")
    p.add_argument("--mapper", help="JSON file {task: checkpoint dir}, or a folder of checkpoints")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--adapter-root", help="the folder /v1/load_lora_adapter may load from (default: loading is off)")
    p.add_argument("--api-key", default=os.environ.get("LORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $LORA_API_KEY)")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="the most tokens one request may ask for")
    p.add_argument("--max-prompts", type=int, help="the most prompts x n in one request (default: --max-num-seqs)")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="the most requests the engine runs together")
    p.add_argument("--max-model-len", type=int,
                   help="prompt plus completion tokens per request (default: the model's context, at most 4096)")
    p.add_argument("--kv-cache-bytes", type=int, help="the KV cache's size in bytes (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="prompt tokens prefilled per engine step; longer prompts are split over steps")
    p.add_argument("--max-waiting", type=int,
                   help="requests that may wait for the engine (default: the engine's); past it, 429 with Retry-After")
    p.add_argument("--max-waiting-tokens", type=int,
                   help="prompt tokens that may wait for the engine, all requests together (default: the engine's "
                        "4,194,304); past it, 429")
    p.add_argument("--max-loras", type=int, help="the most distinct tasks in one engine step (default: no limit)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the K/V of a prompt prefix that an earlier or running request of the same task "
                        "computed (default: on)")
    p.add_argument("--block-size", type=int, help="tokens per prefix-cache block (default: 16)")
    p.add_argument("--prefix-cache-bytes", type=int,
                   help="memory for cached prefix blocks, written as they fill (default: 512 MiB)")
    p.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="run batched decode steps on oneDNN-prepacked copies of the linear weights (1.25-1.4x per step "
                        "on a CPU, one more copy of those weights in memory) and split a single stream's layers "
                        "across threads; default: on for float32 on a CPU)")
    p.add_argument("--max-chat-turns", type=int, default=256, help="the most messages in one chat request")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; then 408 (a stalled client holds nothing)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="after SIGTERM, seconds to let requests in flight finish; then their connections close")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="never compile the decode step; --no-enforce-eager compiles it with torch.compile in the "
                        "background while eager steps serve (default: compile on a GPU, eager on a CPU)")
    return add_quantize_arguments(p)
