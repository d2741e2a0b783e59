"""What the benchmarks say about the machine they ran on: numbers from a shared machine need its CPU and load."""
import os
import platform
import time
from collections.abc import Callable


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 7B13'."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as uptime prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def clock(threads: int) -> tuple[Callable[[], float], str]:
    """The clock a bench times with, and "CPU " or "" for its unit: on one thread the process's CPU time, which
    other processes on a shared machine change far less than wall time; on more, wall time."""
    return (time.process_time, "CPU ") if threads == 1 else (time.perf_counter, "")
