"""Scoring a model's answers on a test set: exact match and ROUGE-L, for a task adapter or the base model."""
import re
import time
from typing import Any

from .data import load_records
from .errors import LoraError
from .multitask import MultiTaskModel

WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one DP row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word tokens (punctuation dropped, as the rouge-score package does)."""
    pred, ref = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}


def answer_budget(tokenizer: Any, records: list[dict], margin: int = 8) -> int:
    """Enough new tokens for the longest expected answer: a longer answer cannot match, and rambling is slow."""
    return max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records) + margin


def evaluate(mt: MultiTaskModel, task: str | None, records: list[dict] | str, metric: str = "exact_match",
             batch_size: int = 16, max_new_tokens: int | None = None, prompt_format: str | None = None) -> dict:
    """Answer every record with `task`'s adapter (None: the base model) and score against its `output`.

    records: a list of {"instruction", "input", "output"} or an Alpaca-format file. The base model has no
    prompt format of its own, so pass the task's (`prompt_format`) to compare the two on equal terms.
    max_new_tokens: None for the longest expected output plus a small margin.
    batch_size: sequences the engine runs at once; every record is queued at once and a finished answer's
        place is taken by the next record at the next step.
    Returns {"task", "metric", "score", "n", "seconds", "max_new_tokens", "predictions": [...]}.
    """
    if metric not in METRICS:
        raise LoraError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    rows: list[dict] = load_records(records) if isinstance(records, str) else records
    if not rows:
        raise LoraError("nothing to evaluate: the test set is empty")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise LoraError(f"batch_size and max_new_tokens must be at least 1, got {batch_size} and {max_new_tokens}")
    score_of = METRICS[metric]
    max_new_tokens = max_new_tokens or answer_budget(mt.tokenizer, rows)
    requests: list[dict[str, Any]] = [{"downstream": task, "instruction": r["instruction"], "input": r.get("input", ""),
                                       "max_new_tokens": max_new_tokens} for r in rows]
    if prompt_format is not None:
        for request in requests:
            request["prompt_format"] = prompt_format
    started = time.perf_counter()
    answers = mt.generate_responses(requests, batch_size=batch_size)  # the engine keeps its batch_size slots full
    seconds = time.perf_counter() - started
    predictions = [{**r, "prediction": a, "score": score_of(a, r["output"])} for r, a in zip(rows, answers)]
    score = sum(p["score"] for p in predictions) / max(len(predictions), 1)
    return {"task": task or "base", "metric": metric, "score": score, "n": len(predictions),
            "seconds": round(seconds, 2), "max_new_tokens": max_new_tokens, "predictions": predictions}
