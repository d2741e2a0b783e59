"""Data-parallel training under torchrun: the process group, sums across processes, and the launcher.

`torchrun --nproc_per_node N -m lora finetune ...` starts N processes that each read torchrun's
RANK / LOCAL_RANK / WORLD_SIZE; without torchrun every function here acts for one process.
"""
import os

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
    """The elementwise sum of a CPU tensor over all processes (the tensor itself with one process)."""
    if not dist.is_initialized():
        return values
    summed = values.to("cuda" if dist.get_backend() == "nccl" else "cpu")  # NCCL reduces GPU tensors only
    dist.all_reduce(summed)
    return summed.cpu()


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Run `python -m lora ARGV` in nproc_per_node processes on this machine, as torchrun does; the exit code.

    --standalone lets torchrun pick a free port, so several runs on one machine do not clash. A failed
    process has printed its own error: its exit code is returned without torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's default is 1 thread per process; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc_per_node}", "-m", "lora", *argv]))
    except ChildFailedError as e:
        return max(e.get_first_failure()[1].exitcode, 1)
    return 0
