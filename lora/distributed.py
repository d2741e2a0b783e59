"""Data-parallel training under torchrun: the process group, sums across processes, and the launcher.

`torchrun --nproc_per_node N -m lora finetune ...` starts N processes that each read torchrun's
RANK / LOCAL_RANK / WORLD_SIZE; without torchrun every function here acts for one process.
"""
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def init(device: str) -> str:
    """Join the process group when there is more than one process; returns this process's device.

    gloo on CPU, NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK).
    """
    if world_size() == 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_all(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over all processes (the tensor itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Run `python -m lora ARGV` in nproc_per_node processes on this machine with torchrun; its exit code.

    --standalone lets torchrun pick a free port, so several runs on one machine do not clash.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               "-m", "lora", *argv]
    return subprocess.call(command)
