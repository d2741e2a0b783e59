"""The finetune command: one LoRA adapter per downstream task, from Alpaca or chat data.

Two halves, read top to bottom: `setup` turns the arguments into a `Run` (data, model + adapter,
optimizer, scheduler, resume state), and `fit` is the loop: one optimizer step, log, validate, save,
stop. Resuming restores optimizer, scheduler and the position in the data order, and dropout masks
are a function of (seed, step, process), so on CPU a resumed run is bitwise identical to an
uninterrupted one. Under torchrun every process trains on its own share of each batch
(DistributedDataParallel) and process 0 alone writes checkpoints, metrics and plots.
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_adapter, load_training_state, save_adapter
from .data import (FORMAT_KEYS, check_packing, collate, length_grouped_batches, load_examples, load_prompt_format,
                   pack, pad_token_id)
from .errors import LoraError
from .inject import find_targets, inject, lora_parameters, read_target_modules
from .loss import CausalLMLoss, logits_are_head_of_hidden, target_count
from .metrics import FILE as METRICS_FILE
from .metrics import append_metrics, restart_metrics
from .models import load_model, resolve_device
from .plots import plot_losses

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Flags whose change on resume makes a different run than the one the checkpoint belongs to.
RUN_SETTINGS = ("seed", "learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "num_epochs", "max_steps",
                "max_seq_length", "lora_dropout", "max_grad_norm", "mixed_precision", "dtype", "train_on_inputs",
                "packing", "group_by_length")


# ---------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The seed's flags, plus the ones PEFT/transformers/TRL users expect."""
    p.add_argument("--model_name_or_path", required=True, help="local HF model folder, or smollm2-135m")
    p.add_argument("--target_modules_path", required=True, help="text file: one module name/suffix/regex per line, or all-linear")
    p.add_argument("--prompt_format_path",
                   help="text file with {instruction} and optionally {input} (Alpaca data only; chat data uses the "
                        "tokenizer's chat template)")
    p.add_argument("--train_data_path", required=True,
                   help="JSON list or JSONL of Alpaca records, OpenAI-style messages or ShareGPT conversations")
    p.add_argument("--data_format", default="auto", choices=["auto", *FORMAT_KEYS],
                   help="the records' format (auto: from the first record)")
    p.add_argument("--train_on_inputs", action="store_true",
                   help="loss on prompts too, not only on answers (each assistant turn and its end-of-turn token)")
    p.add_argument("--packing", action="store_true",
                   help="pack examples into rows of --max_seq_length; attention does not cross examples")
    p.add_argument("--group_by_length", action="store_true",
                   help="batch examples of similar length together (less padding); still a function of seed and epoch")
    p.add_argument("--validation_data_path", help="data for the validation loss/perplexity")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="where epoch-N/, step-K/, best/ and final/ go")
    p.add_argument("--load_from_checkpoint", default="", help="checkpoint to resume from (or to start from)")
    p.add_argument("--allow_changed_settings", action="store_true",
                   help="resume even if flags that change the run (batch size, seed, learning rate...) differ "
                        "from the checkpoint's, with a warning")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--use_rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--batch_size", type=int, default=8,
                   help="examples per process per micro-step; the global batch is batch_size x processes x "
                        "gradient_accumulation_steps")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--lr_scheduler", default="linear", choices=SCHEDULERS)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--save_steps", type=int, default=0, help="also save step-K/ every K optimizer steps")
    p.add_argument("--eval_steps", type=int, default=0,
                   help="also compute the validation loss every K optimizer steps (it always runs after each "
                        "epoch and at the end)")
    p.add_argument("--early_stopping_patience", type=int, default=0,
                   help="stop when the validation loss has not improved for N validations in a row, keeping the "
                        "best adapter in best/ (0: off)")
    p.add_argument("--dtype", default="float32", help="base model dtype: float32, bfloat16 or float16")
    p.add_argument("--mixed_precision", choices=list(PRECISIONS),
                   help="autocast the forward pass to bf16 or fp16; LoRA weights and optimizer stay float32 "
                        "(fp16 adds loss scaling)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each layer's activations in backward instead of keeping them: less memory, "
                        "about a third more compute")
    p.add_argument("--compile", action="store_true", help="torch.compile the model body")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--checkpoint_device", default="cpu", help="device resume state is loaded onto first")
    p.add_argument("--evaluate", default=None, action=argparse.BooleanOptionalAction,
                   help="validation loss/perplexity (default: on when validation data is given)")
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="train in N processes on this machine (runs torchrun; one GPU each on CUDA)")
    return p


def finetune_args(**kwargs) -> argparse.Namespace:
    """The same arguments as a Namespace, for library use: lora.finetune(finetune_args(...))."""
    required = ("model_name_or_path", "target_modules_path", "train_data_path")
    argv = [f"--{k}={kwargs.pop(k)}" for k in required if k in kwargs]
    args = add_arguments(argparse.ArgumentParser()).parse_args(argv)
    for key, value in kwargs.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown finetune argument {key!r}")
        setattr(args, key, value)
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """One LoraError for the first flag out of range."""
    for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "max_seq_length",
                 "nproc_per_node"):
        if getattr(args, name) <= 0:
            raise LoraError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "save_steps", "eval_steps", "warmup_steps", "early_stopping_patience",
                 "max_grad_norm", "weight_decay", "learning_rate"):
        if getattr(args, name) < 0:
            raise LoraError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not args.lora_alpha > 0:  # alpha 0 makes the update zero: an adapter that never changes anything
        raise LoraError(f"--lora_alpha must be positive, got {args.lora_alpha}; the usual choice is twice --lora_rank")
    if not 0 <= args.lora_dropout < 1:
        raise LoraError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.evaluate and not args.validation_data_path:
        raise LoraError("--evaluate needs --validation_data_path")
    if args.early_stopping_patience and not (args.validation_data_path and args.evaluate is not False):
        raise LoraError("--early_stopping_patience watches the validation loss: add --validation_data_path")
    if args.packing and args.group_by_length:
        raise LoraError("--group_by_length has nothing to group with --packing (packed rows are all about "
                        "--max_seq_length long); use one of them")


# ---------------------------------------------------------------- setup

@dataclass
class Run:
    """Everything the loop reads and updates; built by setup()."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: str
    model: torch.nn.Module  # the causal LM with LoRA layers
    loss_fn: CausalLMLoss  # summed loss over `model`, for validation
    train_loss_fn: torch.nn.Module  # loss_fn, or with several processes its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_set: list  # examples, or packed rows with --packing
    val_set: list
    pad_id: int
    task_meta: dict
    settings: dict
    total_steps: int
    metrics_path: str
    step: int = 0
    epoch: int = 0
    examples_done: int = 0  # of the current epoch's data order
    best_val: float = math.inf
    bad_evals: int = 0  # validations in a row without a new best
    bar: tqdm = field(default=None, repr=False)

    @property
    def global_batch_size(self) -> int:
        return self.args.batch_size * self.world_size * self.args.gradient_accumulation_steps

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0


def make_scheduler(optimizer, name, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_settings(args, world_size, task_meta) -> dict:
    """What defines the run, saved with each checkpoint and compared when resuming."""
    return {**{name: getattr(args, name) for name in RUN_SETTINGS},
            "global_batch_size": args.batch_size * world_size * args.gradient_accumulation_steps,
            "train_data_sha256": file_sha256(args.train_data_path),
            "task": {k: v for k, v in task_meta.items() if k != "training_args"}}


def changed_settings(old: dict, new: dict) -> list[str]:
    """Each setting that differs, as a phrase naming its flag."""
    names = {"global_batch_size": "global batch size (--batch_size x processes x --gradient_accumulation_steps)",
             "train_data_sha256": "--train_data_path contents",
             "task": "prompt format, data format or system prompt"}
    return [f"{names.get(k, '--' + k)} was {old[k]!r}, now {new[k]!r}" if k not in ("train_data_sha256", "task")
            else f"{names[k]} changed" for k in new if k in old and old[k] != new[k]]


def check_resume_applies(args, adapter, target_names) -> None:
    """Refuse flags a checkpoint's adapter cannot take: its shape and scaling are fixed."""
    config, path = adapter.config, args.load_from_checkpoint
    fixed = (("--lora_rank", args.lora_rank, config.get("r")), ("--lora_alpha", args.lora_alpha, config.get("lora_alpha")),
             ("--use_rslora", args.use_rslora, bool(config.get("use_rslora"))))
    for flag, asked, saved in fixed:
        if asked != saved:
            raise LoraError(f"{path} was trained with {flag} {saved}, not {asked}; a checkpoint's {flag} cannot "
                            f"change: resume with {flag} {saved}, or start a new run without --load_from_checkpoint")
    if set(target_names) != set(adapter.modules):
        missing = sorted(set(target_names) - set(adapter.modules))[:3]
        extra = sorted(set(adapter.modules) - set(target_names))[:3]
        raise LoraError(f"--target_modules_path {args.target_modules_path} selects other modules than {path} "
                        f"adapts (only in the file: {missing or 'none'}; only in the checkpoint: {extra or 'none'}); "
                        "use the target modules file the checkpoint was trained with")


def resume(run: Run, state: dict) -> None:
    """Continue where `state` left off; settings that change the run need --allow_changed_settings."""
    args = run.args
    changed = changed_settings(state.get("settings", {}), run.settings)
    if changed and not args.allow_changed_settings:
        raise LoraError(f"{args.load_from_checkpoint} belongs to another run: {'; '.join(changed)}. Resume with the "
                        "same flags, or pass --allow_changed_settings to continue anyway")
    if changed and run.is_main:
        print(f"warning: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch = int(state["step"]), int(state["epoch"])
    # Checkpoints written before examples_done existed count whole steps in the epoch.
    run.examples_done = int(state.get("examples_done", state.get("steps_in_epoch", 0) * run.global_batch_size))
    run.best_val, run.bad_evals = float(state.get("best_val", math.inf)), int(state.get("bad_evals", 0))
    if run.examples_done >= len(run.train_set):  # fewer examples now (--allow_changed_settings): that epoch is over
        run.epoch, run.examples_done = run.epoch + 1, 0
    if run.is_main:
        restart_metrics(run.metrics_path, run.step)
        print(f"Resuming from {args.load_from_checkpoint} at epoch {run.epoch}, step {run.step}", file=sys.stderr)


def load_data(args, tokenizer, path, data_format):
    """Tokenized examples of one data file and load_examples' info; notes about examples that did not fit."""
    prompt_format = load_prompt_format(args.prompt_format_path) if args.prompt_format_path else None
    examples, info = load_examples(path, tokenizer, args.max_seq_length, data_format=data_format,
                                   prompt_format=prompt_format, train_on_inputs=args.train_on_inputs)
    if distributed.rank() == 0:
        for count, what in ((info["truncated"], "cut to"), (info["dropped"], "dropped: the prompt alone is over")):
            if count:
                print(f"note: {count} example(s) of {path} {what} --max_seq_length {args.max_seq_length}",
                      file=sys.stderr)
    return examples, info


def cap_max_seq_length(args, model) -> None:
    """Positions past the model's context do not exist: cap --max_seq_length rather than crash on them."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.max_seq_length > limit:
        if distributed.rank() == 0:
            print(f"note: --max_seq_length {args.max_seq_length} is past the model's context of {limit} positions; "
                  f"using {limit}", file=sys.stderr)
        args.max_seq_length = limit


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing gives LoRA weights their gradients even though the layers' inputs come
    # from frozen weights, so no input needs requires_grad forced on.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as e:
        raise LoraError(f"--gradient_checkpointing: {e}") from None


def setup(args: argparse.Namespace) -> Run:
    """Data, model + adapter, optimizer, scheduler and resume state, as `args` (see add_arguments) say."""
    check_arguments(args)
    rank, world_size = distributed.rank(), distributed.world_size()
    device = distributed.init(resolve_device(args.device))
    torch.manual_seed(args.seed)  # the same LoRA initialisation in every process
    targets = read_target_modules(args.target_modules_path)
    if rank > 0:
        distributed.barrier()  # process 0 prepares the default model once; the others then read it
    model, tokenizer = load_model(args.model_name_or_path, dtype=args.dtype, device=device)
    if rank == 0:
        distributed.barrier()
    cap_max_seq_length(args, model)
    pad_id = pad_token_id(tokenizer)
    train_set, info = load_data(args, tokenizer, args.train_data_path, args.data_format)
    task_meta = info["task"]
    if args.evaluate is None:
        args.evaluate = bool(args.validation_data_path)
    val_set = load_data(args, tokenizer, args.validation_data_path, info["format"])[0] if args.evaluate else []
    if args.packing:
        check_packing(model)
        train_set = pack(train_set, args.max_seq_length)

    target_names = find_targets(model, targets)
    state = None
    if args.load_from_checkpoint:
        adapter = load_adapter(model, args.load_from_checkpoint, dropout=args.lora_dropout)
        check_resume_applies(args, adapter, target_names)
        state = load_training_state(args.load_from_checkpoint, device=args.checkpoint_device)
    else:
        inject(model, target_names, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
               rslora=args.use_rslora)
    model.to(device)
    params = lora_parameters(model)
    if rank == 0:
        n_lora = sum(p.numel() for p in params)
        n_base = sum(p.numel() for p in model.parameters()) - n_lora
        print(f"LoRA trains {n_lora:,} parameters, {100 * n_lora / n_base:.3f}% of the base model's {n_base:,}"
              + (f", in {world_size} processes" if world_size > 1 else ""), file=sys.stderr)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    chunked = logits_are_head_of_hidden(model)
    if args.compile:
        (model.base_model if chunked else model).compile()
    loss_fn = CausalLMLoss(model, chunked=chunked)
    train_loss_fn = loss_fn if world_size == 1 else \
        DistributedDataParallel(loss_fn, device_ids=[torch.device(device)] if device.startswith("cuda") else None)

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    global_batch = args.batch_size * world_size * args.gradient_accumulation_steps
    steps_per_epoch = len(epoch_plan(args, train_set, global_batch, epoch=0))
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.num_epochs)
    task_meta["training_args"] = {k: v for k, v in vars(args).items() if k != "func"}
    run = Run(args=args, rank=rank, world_size=world_size, device=device, model=model, loss_fn=loss_fn,
              train_loss_fn=train_loss_fn,
              optimizer=optimizer, scheduler=make_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, total_steps),
              scaler=torch.amp.GradScaler(device.split(":")[0], enabled=args.mixed_precision == "fp16"),
              train_set=train_set, val_set=val_set, pad_id=pad_id, task_meta=task_meta,
              settings=run_settings(args, world_size, task_meta), total_steps=total_steps, metrics_path=os.path.join(args.checkpoint_dir, METRICS_FILE))
    if rank == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    if state is not None:
        resume(run, state)
    elif rank == 0:
        restart_metrics(run.metrics_path, 0)
    return run


# ---------------------------------------------------------------- one step, validation, checkpoints

def epoch_plan(args, train_set, global_batch, epoch) -> list[list[int]]:
    """An epoch's global batches of example indices: a function of (seed, epoch) alone, so every process
    computes the same ones and a resumed run replays them."""
    if args.group_by_length:
        return length_grouped_batches([len(e["input_ids"]) for e in train_set], global_batch, args.seed, epoch)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
    return [order[i:i + global_batch] for i in range(0, len(order), global_batch)]


def epoch_batches(run: Run) -> list[list[int]]:
    """The global batches still to train in run.epoch: its plan without the run.examples_done trained already."""
    left, done = [], run.examples_done
    for batch in epoch_plan(run.args, run.train_set, run.global_batch_size, run.epoch):
        left.append(batch[done:])
        done = max(0, done - len(batch))
    return [batch for batch in left if batch]


def micro_batches(run: Run, batch: list[int]) -> list[tuple[list[int], float]]:
    """This process's share of a global batch: (example indices, weight) per accumulation micro-step.

    Slot (micro-step j, process r) holds examples [(j*P + r)*B, (j*P + r + 1)*B) of the batch. A
    process whose slots are all empty (the short last batch of an epoch) still runs one micro-step,
    with weight 0, because every process must take part in the gradient all-reduce.
    """
    size, procs = run.args.batch_size, run.world_size
    slots = [batch[(j * procs + run.rank) * size:(j * procs + run.rank + 1) * size]
             for j in range(run.args.gradient_accumulation_steps)]
    mine = [(indices, 1.0) for indices in slots if indices]
    return mine or [(batch[:1], 0.0)]


def autocast(run: Run):
    dtype = PRECISIONS.get(run.args.mixed_precision)
    return torch.autocast(run.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def train_step(run: Run, batch: list[int]) -> dict:
    """One optimizer step over a global batch; returns its training metrics.

    Each micro-batch's summed loss is divided by the number of target tokens in the whole global
    batch (all micro-steps, all processes), so accumulation and processes change nothing but speed:
    the gradient is that of the mean loss over the global batch's tokens.
    """
    started = time.perf_counter()
    torch.manual_seed(run.args.seed * 1_000_003 + run.step * 1009 + run.rank)  # dropout masks, resumable
    shares = micro_batches(run, batch)
    work = [(collate([run.train_set[i] for i in indices], run.pad_id), weight) for indices, weight in shares]
    tokens = sum(len(run.train_set[i]["input_ids"]) * weight for indices, weight in shares for i in indices)
    counts = torch.tensor([sum(target_count(b["labels"]) * w for b, w in work), tokens], dtype=torch.float64)
    targets, tokens = distributed.sum_all(counts).tolist()
    total = torch.zeros((), dtype=torch.float64)
    for i, (b, weight) in enumerate(work):
        b = {k: v.to(run.device) for k, v in b.items()}
        last = i == len(work) - 1
        # DDP averages gradients over processes: multiply by their number to get the global sum back.
        with contextlib.nullcontext() if last or run.world_size == 1 else run.train_loss_fn.no_sync():
            with autocast(run):
                summed = run.train_loss_fn(b)
            run.scaler.scale(summed * (weight * run.world_size / max(targets, 1))).backward()
        total += summed.detach().double().cpu() * weight
    loss = float(distributed.sum_all(total)) / max(targets, 1)
    if not math.isfinite(loss):
        raise LoraError(f"loss became {loss} at step {run.step + 1}; lower --learning_rate "
                        f"(now {run.args.learning_rate}) or use --dtype float32")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(run.model), run.args.max_grad_norm or math.inf)
    lr = run.scheduler.get_last_lr()[0]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "lr": lr, "grad_norm": round(float(grad_norm), 6),
            "tokens_per_s": round(tokens / (time.perf_counter() - started), 1)}


@torch.no_grad()
def evaluate_loss(run: Run) -> tuple[float, float]:
    """Token-weighted mean validation loss and its perplexity; each process takes every P-th example."""
    run.model.eval()
    mine = sorted(run.val_set[run.rank::run.world_size], key=lambda e: len(e["input_ids"]))  # less padding
    sums = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), run.args.batch_size):
        batch = collate(mine[i:i + run.args.batch_size], run.pad_id)
        sums[1] += target_count(batch["labels"])
        with autocast(run):
            sums[0] += float(run.loss_fn({k: v.to(run.device) for k, v in batch.items()}))
    run.model.train()
    total, tokens = distributed.sum_all(sums).tolist()
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50))


def validate(run: Run, epoch_position: float) -> None:
    """Validation loss; keeps best/ up to date under --early_stopping_patience."""
    if not run.args.evaluate:
        return
    val_loss, perplexity = evaluate_loss(run)
    if run.is_main:
        append_metrics(run.metrics_path, {"step": run.step, "epoch": round(epoch_position, 4), "val_loss": val_loss,
                                          "val_perplexity": perplexity})
        run.bar.write(f"step {run.step}: validation loss {val_loss:.4f}, perplexity {perplexity:.2f}", file=sys.stderr)
    if val_loss < run.best_val:
        run.best_val, run.bad_evals = val_loss, 0
        if run.args.early_stopping_patience:
            save(run, "best", with_state=False)
    else:
        run.bad_evals += 1


def save(run: Run, name: str, with_state: bool = True) -> str:
    """Checkpoint `name` under --checkpoint_dir (process 0 writes it, atomically); returns its path."""
    path = os.path.join(run.args.checkpoint_dir, name)
    if not run.is_main:
        return path
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "step": run.step, "epoch": run.epoch, "examples_done": run.examples_done,
             "best_val": run.best_val, "bad_evals": run.bad_evals, "settings": run.settings,
             **({"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {})}
    return save_adapter(run.model, path, run.args.model_name_or_path, run.task_meta, state if with_state else None)


def early_stopped(run: Run) -> bool:
    return 0 < run.args.early_stopping_patience <= run.bad_evals


# ---------------------------------------------------------------- the loop

def fit(run: Run) -> str:
    """Train until --num_epochs, --max_steps or early stopping; returns the final checkpoint's path."""
    args = run.args
    run.bar = tqdm(total=run.total_steps, initial=run.step, desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not run.is_main)
    run.model.train()
    batches = epoch_batches(run)
    while run.step < run.total_steps and run.epoch < args.num_epochs and not early_stopped(run):
        batch = batches.pop(0)
        row = train_step(run, batch)
        run.step += 1
        run.examples_done += len(batch)
        epoch_position = run.epoch + run.examples_done / len(run.train_set)
        if run.is_main:
            append_metrics(run.metrics_path, {"step": run.step, "epoch": round(epoch_position, 4), **row})
            run.bar.set_postfix(epoch=run.epoch + 1, loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
            run.bar.update()

        epoch_end = not batches
        if epoch_end:
            run.epoch, run.examples_done = run.epoch + 1, 0
            batches = epoch_batches(run)
        if epoch_end or run.step == run.total_steps or (args.eval_steps and run.step % args.eval_steps == 0):
            validate(run, epoch_position)
        if args.save_steps and run.step % args.save_steps == 0:
            save(run, f"step-{run.step}")
        if epoch_end:
            save(run, f"epoch-{run.epoch}")
    run.bar.close()
    if early_stopped(run) and run.is_main:
        print(f"Early stopping: no better validation loss in {run.bad_evals} validations; the best, "
              f"{run.best_val:.4f}, is in {os.path.join(args.checkpoint_dir, 'best')}", file=sys.stderr)
    final = save(run, "final")
    if run.is_main:
        plot_losses({"run": run.metrics_path}, os.path.join(args.checkpoint_dir, "loss.png"))
        print(f"Saved adapter to {final}", file=sys.stderr)
    return final


def finetune(args: argparse.Namespace) -> str:
    """Train one adapter as `args` (see add_arguments) say; returns the final checkpoint's path."""
    try:
        return fit(setup(args))
    finally:
        distributed.close()
