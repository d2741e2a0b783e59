"""The finetune loop: one LoRA adapter per downstream task, from Alpaca or chat data.

Two halves, read top to bottom: `setup` turns a TrainConfig into a `Run` (data, model + adapter,
optimizer, scheduler, resume position), and `fit` is the loop: one optimizer step, log, validate, save,
stop. Resuming (lora.resume) restores optimizer, scheduler and the position in the data order, and
dropout masks are a function of (seed, step, process), so on CPU a resumed run is bitwise identical to
an uninterrupted one. Under torchrun every process trains on its own share of each batch
(DistributedDataParallel) and process 0 alone writes checkpoints, metrics and plots.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_adapter, load_training_state, save_adapter
from .data import check_packing, collate, length_grouped_batches, load_examples, load_prompt_format, pack, pad_token_id
from .errors import LoraError
from .inject import find_targets, inject, lora_parameters, read_target_modules
from .loss import CausalLMLoss, logits_are_head_of_hidden, target_count
from .metrics import FILE as METRICS_FILE
from .metrics import append_metrics, restart_metrics
from .models import context_length, load_model, resolve_device
from .plots import plot_losses
from .quant import model_quantization, num_parameters
from .resume import Position, check_resume_applies, restore, run_settings
from .structured import load_response_schema
from .train_args import config_from_args
from .train_config import TrainConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision


# ---------------------------------------------------------------- setup

@dataclass
class Run:
    """Everything the loop reads and updates; built by setup()."""
    config: TrainConfig  # as given, with --max_seq_length capped to the model and --evaluate decided
    rank: int
    world_size: int
    device: str
    model: torch.nn.Module  # the causal LM with LoRA layers
    loss_fn: CausalLMLoss  # summed loss over `model`, for validation
    train_loss_fn: CausalLMLoss | DistributedDataParallel  # loss_fn, or its DDP wrapper with several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_set: list  # examples, or packed rows with --packing
    val_set: list
    pad_id: int
    task_meta: dict
    settings: dict  # lora.resume.run_settings: saved with each checkpoint, compared on resume
    total_steps: int
    metrics_path: str
    step: int = 0
    epoch: int = 0
    examples_done: int = 0  # of the current epoch's data order
    best_val: float = math.inf
    bad_evals: int = 0  # validations in a row without a new best
    bar: Any = field(default=None, repr=False)  # the tqdm progress bar, while fit() runs

    @property
    def global_batch_size(self) -> int:
        return self.config.batch_size * self.world_size * self.config.gradient_accumulation_steps

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_data(config: TrainConfig, tokenizer: Any, path: str, data_format: str) -> tuple[list, dict]:  # noqa: ANN401
    """Tokenized examples of one data file and load_examples' info; notes about examples that did not fit."""
    prompt_format = load_prompt_format(config.prompt_format_path) if config.prompt_format_path else None
    examples, info = load_examples(path, tokenizer, config.max_seq_length, data_format=data_format,
                                   prompt_format=prompt_format, train_on_inputs=config.train_on_inputs)
    if distributed.rank() == 0:
        for count, what in ((info["truncated"], "cut to"), (info["dropped"], "dropped: the prompt alone is over")):
            if count:
                print(f"note: {count} example(s) of {path} {what} --max_seq_length {config.max_seq_length}",
                      file=sys.stderr)
    return examples, info


def cap_max_seq_length(config: TrainConfig, model: torch.nn.Module) -> TrainConfig:
    """Positions past the model's context do not exist: cap --max_seq_length rather than crash on them."""
    limit = context_length(model.config)
    if config.max_seq_length <= limit:
        return config
    if distributed.rank() == 0:
        print(f"note: --max_seq_length {config.max_seq_length} is past the model's context of {limit} positions; "
              f"using {limit}", file=sys.stderr)
    return replace(config, max_seq_length=limit)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # Non-reentrant checkpointing gives LoRA weights their gradients even though the layers' inputs come
    # from frozen weights, so no input needs requires_grad forced on.
    enable: Any = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as e:
        raise LoraError(f"--gradient_checkpointing: {e}") from None


def setup(config: TrainConfig) -> Run:
    """Data, model + adapter, optimizer, scheduler and resume position, as `config` says."""
    config.check()
    config = replace(config, evaluate=config.evaluates)
    rank, world_size = distributed.rank(), distributed.world_size()
    device = distributed.init(resolve_device(config.device))
    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    targets = read_target_modules(config.target_modules_path)
    schema = load_response_schema(config.response_schema) if config.response_schema else None
    if rank > 0:
        distributed.barrier()  # process 0 prepares the default model once; the others then read it
    model, tokenizer = load_model(config.model_name_or_path, dtype=config.dtype, device=device,
                                  quantize=config.quantize, double_quant=config.double_quant,
                                  compute_dtype=config.compute_dtype)
    if rank == 0:
        distributed.barrier()
    config = cap_max_seq_length(config, model)
    pad_id = pad_token_id(tokenizer)
    train_set, info = load_data(config, tokenizer, config.train_data_path, config.data_format)
    task_meta = info["task"] if schema is None else {**info["task"], "response_schema": schema}
    val_set = load_data(config, tokenizer, config.validation_data_path, info["format"])[0] \
        if config.evaluate and config.validation_data_path else []
    if config.packing:
        check_packing(model)
        train_set = pack(train_set, config.max_seq_length)

    target_names = find_targets(model, targets)
    state = None
    if config.load_from_checkpoint:
        adapter = load_adapter(model, config.load_from_checkpoint, dropout=config.lora_dropout)
        check_resume_applies(config, adapter, target_names)
        state = load_training_state(config.load_from_checkpoint, device=config.checkpoint_device)
    else:
        inject(model, target_names, r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
               rslora=config.use_rslora)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() as its dtype-only overload
    params = lora_parameters(model)
    if rank == 0:
        n_lora = sum(p.numel() for p in params)
        n_base = num_parameters(model) - n_lora
        print(f"LoRA trains {n_lora:,} parameters, {100 * n_lora / n_base:.3f}% of the base model's {n_base:,}"
              + (f", in {world_size} processes" if world_size > 1 else ""), file=sys.stderr)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    chunked = logits_are_head_of_hidden(model)
    if config.compile:
        (model.base_model if chunked else model).compile()
    loss_fn = CausalLMLoss(model, chunked=chunked)
    train_loss_fn = loss_fn if world_size == 1 else \
        DistributedDataParallel(loss_fn, device_ids=[torch.device(device)] if device.startswith("cuda") else None)

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    global_batch = config.batch_size * world_size * config.gradient_accumulation_steps
    steps_per_epoch = len(epoch_plan(config, train_set, global_batch, epoch=0))
    total_steps = int(min(config.max_steps or math.inf, steps_per_epoch * config.num_epochs))
    scheduler = make_scheduler(optimizer, config.lr_scheduler, config.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=config.mixed_precision == "fp16")
    task_meta["training_args"] = asdict(config)
    settings = run_settings(config, world_size, task_meta)
    quantization = model_quantization(model)
    if quantization is not None:  # the base the adapter was trained on; PEFT users pass it to BitsAndBytesConfig
        task_meta["quantization_config"] = quantization
    position = Position()
    if state is not None:
        position = restore(state, config, settings, optimizer, scheduler, scaler, len(train_set), rank == 0)
    run = Run(config=config, rank=rank, world_size=world_size, device=device, model=model, loss_fn=loss_fn,
              train_loss_fn=train_loss_fn, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              train_set=train_set, val_set=val_set, pad_id=pad_id, task_meta=task_meta, settings=settings,
              total_steps=total_steps, metrics_path=os.path.join(config.checkpoint_dir, METRICS_FILE),
              **asdict(position))
    if rank == 0:
        os.makedirs(config.checkpoint_dir, exist_ok=True)
        restart_metrics(run.metrics_path, run.step)  # a resumed run drops the rows past its checkpoint
        if state is not None:
            print(f"Resuming from {config.load_from_checkpoint} at epoch {run.epoch}, step {run.step}",
                  file=sys.stderr)
    return run


# ---------------------------------------------------------------- one step, validation, checkpoints

def epoch_plan(config: TrainConfig, train_set: list, global_batch: int, epoch: int) -> list[list[int]]:
    """An epoch's global batches of example indices: a function of (seed, epoch) alone, so every process
    computes the same ones and a resumed run replays them."""
    if config.group_by_length:
        return length_grouped_batches([len(e["input_ids"]) for e in train_set], global_batch, config.seed, epoch)
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(len(train_set), generator=generator).tolist()
    return [order[i:i + global_batch] for i in range(0, len(order), global_batch)]


def epoch_batches(run: Run) -> list[list[int]]:
    """The global batches still to train in run.epoch: its plan without the run.examples_done trained already."""
    left, done = [], run.examples_done
    for batch in epoch_plan(run.config, run.train_set, run.global_batch_size, run.epoch):
        left.append(batch[done:])
        done = max(0, done - len(batch))
    return [batch for batch in left if batch]


def micro_batches(run: Run, batch: list[int]) -> list[tuple[list[int], float]]:
    """This process's share of a global batch: (example indices, weight) per accumulation micro-step.

    Slot (micro-step j, process r) holds examples [(j*P + r)*B, (j*P + r + 1)*B) of the batch. A
    process whose slots are all empty (the short last batch of an epoch) still runs one micro-step,
    with weight 0, because every process must take part in the gradient all-reduce.
    """
    size, procs = run.config.batch_size, run.world_size
    slots = [batch[(j * procs + run.rank) * size:(j * procs + run.rank + 1) * size]
             for j in range(run.config.gradient_accumulation_steps)]
    mine = [(indices, 1.0) for indices in slots if indices]
    return mine or [(batch[:1], 0.0)]


def autocast(run: Run) -> torch.autocast:
    dtype = AUTOCAST_DTYPES.get(run.config.mixed_precision or "")
    return torch.autocast(run.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def train_step(run: Run, batch: list[int]) -> dict:
    """One optimizer step over a global batch; returns its training metrics.

    Each micro-batch's summed loss is divided by the number of target tokens in the whole global
    batch (all micro-steps, all processes), so accumulation and processes change nothing but speed:
    the gradient is that of the mean loss over the global batch's tokens.
    """
    started = time.perf_counter()
    torch.manual_seed(run.config.seed * 1_000_003 + run.step * 1009 + run.rank)  # dropout masks, resumable
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
        ddp = run.train_loss_fn if isinstance(run.train_loss_fn, DistributedDataParallel) else None
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast(run):
                summed = run.train_loss_fn(b)
            run.scaler.scale(summed * (weight * run.world_size / max(targets, 1))).backward()
        total += summed.detach().double().cpu() * weight
    loss = float(distributed.sum_all(total)) / max(targets, 1)
    if not math.isfinite(loss):
        raise LoraError(f"loss became {loss} at step {run.step + 1}; lower --learning_rate "
                        f"(now {run.config.learning_rate}) or use --dtype float32")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(run.model), run.config.max_grad_norm or math.inf)
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
    for i in range(0, len(mine), run.config.batch_size):
        batch = collate(mine[i:i + run.config.batch_size], run.pad_id)
        sums[1] += target_count(batch["labels"])
        with autocast(run):
            sums[0] += float(run.loss_fn({k: v.to(run.device) for k, v in batch.items()}))
    run.model.train()
    total, tokens = distributed.sum_all(sums).tolist()
    loss = total / max(tokens, 1)
    return loss, math.exp(min(loss, 50))


def validate(run: Run, epoch_position: float) -> None:
    """Validation loss; keeps best/ up to date under --early_stopping_patience."""
    if not run.config.evaluate:
        return
    val_loss, perplexity = evaluate_loss(run)
    if run.is_main:
        append_metrics(run.metrics_path, {"step": run.step, "epoch": round(epoch_position, 4), "val_loss": val_loss,
                                          "val_perplexity": perplexity})
        run.bar.write(f"step {run.step}: validation loss {val_loss:.4f}, perplexity {perplexity:.2f}", file=sys.stderr)
    if val_loss < run.best_val:
        run.best_val, run.bad_evals = val_loss, 0
        if run.config.early_stopping_patience:
            save(run, "best", with_state=False)
    else:
        run.bad_evals += 1


def save(run: Run, name: str, with_state: bool = True) -> str:
    """Checkpoint `name` under --checkpoint_dir (process 0 writes it, atomically); returns its path."""
    path = os.path.join(run.config.checkpoint_dir, name)
    if not run.is_main:
        return path
    position = Position(step=run.step, epoch=run.epoch, examples_done=run.examples_done, best_val=run.best_val,
                        bad_evals=run.bad_evals)  # the fields lora.resume.restore reads back
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "settings": run.settings, **asdict(position),
             **({"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {})}
    return save_adapter(run.model, path, run.config.model_name_or_path, run.task_meta, state if with_state else None)


def early_stopped(run: Run) -> bool:
    return 0 < run.config.early_stopping_patience <= run.bad_evals


# ---------------------------------------------------------------- the loop

def fit(run: Run) -> str:
    """Train until --num_epochs, --max_steps or early stopping; returns the final checkpoint's path."""
    config = run.config
    run.bar = tqdm(total=run.total_steps, initial=run.step, desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not run.is_main)
    run.model.train()
    batches = epoch_batches(run)
    while run.step < run.total_steps and run.epoch < config.num_epochs and not early_stopped(run):
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
        if epoch_end or run.step == run.total_steps or (config.eval_steps and run.step % config.eval_steps == 0):
            validate(run, epoch_position)
        if config.save_steps and run.step % config.save_steps == 0:
            save(run, f"step-{run.step}")
        if epoch_end:
            save(run, f"epoch-{run.epoch}")
    run.bar.close()
    if early_stopped(run) and run.is_main:
        print(f"Early stopping: no better validation loss in {run.bad_evals} validations; the best, "
              f"{run.best_val:.4f}, is in {os.path.join(config.checkpoint_dir, 'best')}", file=sys.stderr)
    final = save(run, "final")
    if run.is_main:
        plot_losses({"run": run.metrics_path}, os.path.join(config.checkpoint_dir, "loss.png"))
        print(f"Saved adapter to {final}", file=sys.stderr)
    return final


def finetune(config: TrainConfig | argparse.Namespace) -> str:
    """Train one adapter as `config` (lora.finetune_args(...), or parsed `lora finetune` flags) says; returns the
    final checkpoint's path."""
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    try:
        return fit(setup(config))
    finally:
        distributed.close()
