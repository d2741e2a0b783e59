"""The finetune loop: one LoRA adapter per downstream task from Alpaca-format data.

Read top to bottom: arguments, data, model + adapter, optimizer, the loop, checkpoints.
Resuming restores optimizer, scheduler, RNG and data order, so on CPU a resumed run is bitwise
identical to an uninterrupted one.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tqdm.auto import tqdm

from .checkpoint import load_adapter, load_training_state, save_adapter
from .data import collate, load_dataset, load_prompt_format, pad_token_id
from .errors import LoraError
from .inject import inject, lora_parameters, read_target_modules
from .models import load_model, resolve_device
from .plots import plot_losses, read_metrics

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def add_arguments(p):
    """The seed's flags, plus the ones PEFT/transformers users expect."""
    p.add_argument("--model_name_or_path", required=True, help="local HF model folder, or smollm2-135m")
    p.add_argument("--target_modules_path", required=True, help="text file: one module name/suffix/regex per line, or all-linear")
    p.add_argument("--prompt_format_path", required=True, help="text file with {instruction} and optionally {input}")
    p.add_argument("--train_data_path", required=True, help="Alpaca-format JSON list or JSONL")
    p.add_argument("--validation_data_path", help="Alpaca-format data for validation loss/perplexity each epoch")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="where epoch-N/, step-K/ and final/ go")
    p.add_argument("--load_from_checkpoint", default="", help="checkpoint to resume from (or to start from)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--use_rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--lr_scheduler", default="linear", choices=SCHEDULERS)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--save_steps", type=int, default=0, help="also save step-K/ every K optimizer steps")
    p.add_argument("--eval_steps", type=int, default=0,
                   help="also compute the validation loss every K optimizer steps (it always runs after each "
                        "epoch and at the end)")
    p.add_argument("--dtype", default="float32", help="base model dtype: float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--checkpoint_device", default="cpu", help="device resume state is loaded onto first")
    p.add_argument("--evaluate", default=None, action=argparse.BooleanOptionalAction,
                   help="validation loss/perplexity (default: on when validation data is given)")
    return p


def finetune_args(**kwargs):
    """The same arguments as a Namespace, for library use: lora.finetune(finetune_args(...))."""
    required = ("model_name_or_path", "target_modules_path", "prompt_format_path", "train_data_path")
    argv = [f"--{k}={kwargs.pop(k)}" for k in required if k in kwargs]
    args = add_arguments(argparse.ArgumentParser()).parse_args(argv)
    for key, value in kwargs.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown finetune argument {key!r}")
        setattr(args, key, value)
    return args


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, name, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(n, batch_size, seed, epoch):
    """The data order of one epoch depends only on (seed, epoch): resuming replays it exactly."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_loss(model, examples, batch_size, pad_id, device):
    """Token-weighted mean loss over `examples`, and its perplexity."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    model.train(was_training)
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50))


def finetune(args):
    """Train one adapter as `args` (see add_arguments) says; returns the final checkpoint's path."""
    for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "max_seq_length"):
        if getattr(args, name) <= 0:
            raise LoraError(f"--{name} must be positive, got {getattr(args, name)}")
    set_seed(args.seed)
    device = resolve_device(args.device)
    prompt_format = load_prompt_format(args.prompt_format_path)
    targets = read_target_modules(args.target_modules_path)
    model, tokenizer = load_model(args.model_name_or_path, dtype=args.dtype, device=device)
    pad_id = pad_token_id(tokenizer)
    train_set, cut = load_dataset(args.train_data_path, tokenizer, prompt_format, args.max_seq_length)
    if cut:
        print(f"note: {cut} training example(s) cut to --max_seq_length {args.max_seq_length}", file=sys.stderr)
    evaluate = args.evaluate if args.evaluate is not None else bool(args.validation_data_path)
    if evaluate and not args.validation_data_path:
        raise LoraError("--evaluate needs --validation_data_path")
    val_set = load_dataset(args.validation_data_path, tokenizer, prompt_format, args.max_seq_length)[0] if evaluate else []

    state = None
    if args.load_from_checkpoint:
        load_adapter(model, args.load_from_checkpoint, dropout=args.lora_dropout)
        state = load_training_state(args.load_from_checkpoint, device=args.checkpoint_device)
    else:
        inject(model, targets, r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
               rslora=args.use_rslora)
    model.to(device)
    params = lora_parameters(model)
    n_lora, n_base = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)
    print(f"LoRA trains {n_lora:,} parameters, {100 * n_lora / n_base:.3f}% of the base model's {n_base:,}", file=sys.stderr)

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / args.batch_size) / args.gradient_accumulation_steps)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.num_epochs)
    scheduler = make_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, total_steps)
    step, start_epoch, skip = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        step, start_epoch, skip = int(state["step"]), int(state["epoch"]), int(state["steps_in_epoch"])
        print(f"Resuming from {args.load_from_checkpoint} at epoch {start_epoch}, step {step}", file=sys.stderr)

    os.makedirs(args.checkpoint_dir, exist_ok=True)
    metrics_path = os.path.join(args.checkpoint_dir, "metrics.jsonl")
    kept = [m for m in read_metrics(metrics_path) if m["step"] <= step] if state is not None else []
    with open(metrics_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    task_meta = {"prompt_format": prompt_format,
                 "training_args": {k: v for k, v in vars(args).items() if k != "func"}}

    def save(name, epoch, steps_in_epoch, training_state=True):
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state(),
                 "step": step, "epoch": epoch, "steps_in_epoch": steps_in_epoch} if training_state else None
        return save_adapter(model, os.path.join(args.checkpoint_dir, name), args.model_name_or_path, task_meta, state)

    def log(**row):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    validated_at = None

    def validate(epoch_position):
        nonlocal validated_at
        if not evaluate or validated_at == step:
            return
        val_loss, ppl = evaluate_loss(model, val_set, args.batch_size, pad_id, device)
        log(step=step, epoch=epoch_position, val_loss=val_loss, val_perplexity=ppl)
        bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {ppl:.2f}", file=sys.stderr)
        validated_at = step

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", dynamic_ncols=True)
    epoch, done_in_epoch = start_epoch, skip
    while epoch < args.num_epochs and step < total_steps:
        batches = epoch_batches(len(train_set), args.batch_size, args.seed, epoch)
        groups = [batches[i:i + args.gradient_accumulation_steps]
                  for i in range(0, len(batches), args.gradient_accumulation_steps)]
        for k, group in enumerate(groups):
            if k < skip:
                continue
            if step >= total_steps:
                break
            done_in_epoch = k + 1
            started, tokens, loss_sum = time.perf_counter(), 0, 0.0
            for indices in group:
                batch = {key: v.to(device) for key, v in collate([train_set[i] for i in indices], pad_id).items()}
                loss = model(**batch).loss / len(group)
                loss.backward()
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(loss_sum):
                raise LoraError(f"loss became {loss_sum} at step {step + 1}; lower --learning_rate "
                                f"(now {args.learning_rate}) or use --dtype float32")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tps = tokens / (time.perf_counter() - started)
            log(step=step, epoch=epoch + (k + 1) / len(groups), loss=loss_sum, lr=lr, tokens_per_s=round(tps, 1))
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update()
            if args.eval_steps and step % args.eval_steps == 0:
                validate(epoch + (k + 1) / len(groups))
            if args.save_steps and step % args.save_steps == 0:
                save(f"step-{step}", epoch, k + 1)
        else:
            skip = done_in_epoch = 0
            epoch += 1
            validate(epoch)
            save(f"epoch-{epoch}", epoch, 0)
            continue
        validate(epoch + done_in_epoch / len(groups))  # max_steps reached inside the epoch
        break
    bar.close()
    final = save("final", epoch, done_in_epoch)
    plot_losses({"run": metrics_path}, os.path.join(args.checkpoint_dir, "loss.png"))
    print(f"Saved adapter to {final}", file=sys.stderr)
    return final
