"""What the benchmarks say about the machine they ran on: numbers from a shared machine need its CPU and load."""
import os
import platform


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
