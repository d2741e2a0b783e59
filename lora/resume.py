"""Resuming a run: the settings that define it, refusing changed ones, and restoring optimizer, scheduler and position.

Nothing random needs restoring: the data order is a function of (seed, epoch) and dropout masks of
(seed, step, process), so the step and the examples done in the epoch are the whole position.
"""
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import TRAINING_STATE, Adapter
from .errors import LoraError
from .files import MAX_DATA_BYTES, read_bytes
from .train_config import TrainConfig

# Flags whose change on resume makes a different run than the one the checkpoint belongs to.
RUN_SETTINGS = ("seed", "learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "num_epochs", "max_steps",
                "max_seq_length", "lora_dropout", "max_grad_norm", "mixed_precision", "dtype", "train_on_inputs",
                "packing", "group_by_length", "quantize", "double_quant", "compute_dtype")


@dataclass
class Position:
    """Where a run stands, besides its optimizer and scheduler: what a resumed run continues from."""
    step: int = 0
    epoch: int = 0
    examples_done: int = 0  # of the current epoch's data order
    best_val: float = math.inf
    bad_evals: int = 0  # validations in a row without a new best


def file_sha256(path: str) -> str:
    return hashlib.sha256(read_bytes(path, what="training data", max_bytes=MAX_DATA_BYTES)).hexdigest()


def run_settings(config: TrainConfig, world_size: int, task_meta: dict) -> dict:
    """What defines the run, saved with each checkpoint and compared when resuming."""
    return {**{name: getattr(config, name) for name in RUN_SETTINGS},
            "global_batch_size": config.batch_size * world_size * config.gradient_accumulation_steps,
            "train_data_sha256": file_sha256(config.train_data_path),
            "task": {k: v for k, v in task_meta.items() if k != "training_args"}}


def changed_settings(old: dict, new: dict) -> list[str]:
    """Each setting that differs, as a phrase naming its flag."""
    names = {"global_batch_size": "global batch size (--batch_size x processes x --gradient_accumulation_steps)",
             "train_data_sha256": "--train_data_path contents",
             "task": "prompt format, data format or system prompt"}
    return [f"{names.get(k, '--' + k)} was {old[k]!r}, now {new[k]!r}" if k not in ("train_data_sha256", "task")
            else f"{names[k]} changed" for k in new if k in old and old[k] != new[k]]


def check_resume_applies(config: TrainConfig, adapter: Adapter, target_names: list[str]) -> None:
    """Refuse flags a checkpoint's adapter cannot take: its shape and scaling are fixed."""
    saved, path = adapter.config, config.load_from_checkpoint
    fixed = (("--lora_rank", config.lora_rank, saved.get("r")),
             ("--lora_alpha", config.lora_alpha, saved.get("lora_alpha")),
             ("--use_rslora", config.use_rslora, bool(saved.get("use_rslora"))))
    for flag, asked, was in fixed:
        if asked != was:
            raise LoraError(f"{path} was trained with {flag} {was}, not {asked}; a checkpoint's {flag} cannot "
                            f"change: resume with {flag} {was}, or start a new run without --load_from_checkpoint")
    if set(target_names) != set(adapter.modules):
        missing = sorted(set(target_names) - set(adapter.modules))[:3]
        extra = sorted(set(adapter.modules) - set(target_names))[:3]
        raise LoraError(f"--target_modules_path {config.target_modules_path} selects other modules than {path} "
                        f"adapts (only in the file: {missing or 'none'}; only in the checkpoint: {extra or 'none'}); "
                        "use the target modules file the checkpoint was trained with")


def restore(state: dict, config: TrainConfig, settings: dict, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, train_size: int,
            is_main: bool) -> Position:
    """Load `state` (the checkpoint's training state) into the optimizer, scheduler and loss scaler, and return
    the position to continue from. Settings that change the run need --allow_changed_settings."""
    where = os.path.join(config.load_from_checkpoint, TRAINING_STATE)
    changed = changed_settings(state["settings"], settings)  # every field's type: checkpoint.load_training_state
    if changed and not config.allow_changed_settings:
        raise LoraError(f"{config.load_from_checkpoint} belongs to another run: {'; '.join(changed)}. Resume with "
                        "the same flags, or pass --allow_changed_settings to continue anyway")
    if changed and is_main:
        print(f"warning: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
    loaders: list[tuple[str, Any]] = [("optimizer", optimizer), ("scheduler", scheduler)]
    for name, target in loaders + ([("scaler", scaler)] if "scaler" in state else []):
        try:
            target.load_state_dict(state[name])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise LoraError(f"{where}: field {name!r} does not fit this run ({type(e).__name__}: {e}); resume from "
                            "another checkpoint") from None
    position = Position(step=state["step"], epoch=state["epoch"], examples_done=state["examples_done"],
                        bad_evals=state["bad_evals"], best_val=float(state["best_val"]))
    if position.examples_done >= train_size:  # fewer examples now (--allow_changed_settings): that epoch is over
        position.epoch, position.examples_done = position.epoch + 1, 0
    return position
