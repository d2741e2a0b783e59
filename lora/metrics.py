"""metrics.jsonl: one JSON object per line, written by training and read by plots and reports.

Training rows: {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}.
Validation rows: {"step", "epoch", "val_loss", "val_perplexity"}.
"""
import json
import os

from .errors import LoraError
from .files import MissingFileError, read_text

FILE = "metrics.jsonl"
MAX_METRICS_BYTES = 1 << 30  # a row is ~150 bytes: millions of steps


def read_metrics(path: str) -> list[dict]:
    """Every row of a metrics.jsonl file; [] when it does not exist. A row that is not training's is a LoraError."""
    try:
        text = read_text(path, what="metrics file", max_bytes=MAX_METRICS_BYTES)
    except MissingFileError:
        return []
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)):
            raise LoraError(f"{path} line {lineno} is not a metrics row (a JSON object with an integer step); "
                            "delete the line, or the file to start the metrics afresh")
        rows.append(row)
    return rows


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def restart_metrics(path: str, step: int) -> None:
    """Keep the rows up to `step`: a resumed run writes what comes after again.

    Args:
        path: the run's metrics.jsonl.
        step: the optimizer step training resumes after; 0 starts an empty file.
    """
    kept = [row for row in read_metrics(path) if row["step"] <= step] if step else []
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(tmp, path)


def train_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "loss" in row]


def validation_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "val_loss" in row]
