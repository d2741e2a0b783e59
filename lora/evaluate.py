"""Scoring a model's answers on a test set (exact match, ROUGE-L, JSON and schema validity), for a task or the base."""
import functools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import jsonschema

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


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def json_valid(prediction: str, reference: str = "") -> float:
    """1 if the whole answer is one JSON value (a ```json fence around it does not parse, as a program sees it)."""
    return float(parses(prediction))


@functools.lru_cache(maxsize=16)
def schema_validator(schema_text: str) -> Any:
    """A jsonschema validator for a schema given as JSON text (cached: the same schema scores every answer)."""
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LoraError(f"the response schema is not a valid JSON schema: {e.message}") from None
    return cls(schema)


def schema_valid(prediction: str, reference: str = "", schema: dict | None = None) -> float:
    """1 if the answer is JSON that the task's response schema accepts."""
    if schema is None:
        raise LoraError("the schema_valid metric needs a JSON schema")
    return float(parses(prediction) and schema_validator(json.dumps(schema)).is_valid(json.loads(prediction)))


METRICS: dict[str, Callable[..., float]] = {"exact_match": exact_match, "rouge_l": rouge_l, "json_valid": json_valid,
                                            "schema_valid": schema_valid}


def answer_budget(tokenizer: Any, records: list[dict], margin: int = 8) -> int:
    """Enough new tokens for the longest expected answer: a longer answer cannot match, and rambling is slow."""
    return max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records) + margin


def task_schema(mt: MultiTaskModel, task: str | None) -> dict | None:
    """The task's response_schema from its lora_task.json; None for the base model or a task without one."""
    return mt.task_meta(task).get("response_schema") if task else None


def evaluate(mt: MultiTaskModel, task: str | None, records: list[dict] | str, metric: str = "exact_match",
             batch_size: int = 16, max_new_tokens: int | None = None, prompt_format: str | None = None,
             schema: dict | None = None, constrained: bool = True) -> dict:
    """Answer every record with `task`'s adapter (None: the base model) and score against its `output`.

    records: a list of {"instruction", "input", "output"} or an Alpaca-format file. The base model has no
    prompt format of its own, so pass the task's (`prompt_format`) to compare the two on equal terms.
    max_new_tokens: None for the longest expected output plus a small margin.
    batch_size: sequences the engine runs at once; every record is queued at once and a finished answer's
        place is taken by the next record at the next step.
    schema: the JSON schema schema_valid checks answers against; None for the task's response_schema.
    constrained: answers follow the task's response_schema as served (constrained decoding); False scores
        the task's free answers (to measure what the schema adds).
    Returns {"task", "metric", "score", "n", "seconds", "max_new_tokens", "constrained", "predictions": [...]}.
    """
    if metric not in METRICS:
        raise LoraError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    rows: list[dict] = load_records(records) if isinstance(records, str) else records
    if not rows:
        raise LoraError("nothing to evaluate: the test set is empty")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise LoraError(f"batch_size and max_new_tokens must be at least 1, got {batch_size} and {max_new_tokens}")
    score_of = METRICS[metric]
    if metric == "schema_valid":
        schema = schema if schema is not None else task_schema(mt, task)
        if schema is None:
            raise LoraError(f"the schema_valid metric needs a JSON schema, and {task or 'the base model'} has no "
                            "response_schema in lora_task.json; train it with --response_schema, or use json_valid")
        score_of = functools.partial(schema_valid, schema=schema)
    max_new_tokens = max_new_tokens or answer_budget(mt.tokenizer, rows)
    requests: list[dict[str, Any]] = [{"downstream": task, "instruction": r["instruction"], "input": r.get("input", ""),
                                       "max_new_tokens": max_new_tokens} for r in rows]
    for request in requests:
        if prompt_format is not None:
            request["prompt_format"] = prompt_format
        if not constrained:
            request["response_format"] = {"type": "text"}  # turns the task's response_schema off
    started = time.perf_counter()
    answers = mt.generate_responses(requests, batch_size=batch_size)  # the engine keeps its batch_size slots full
    seconds = time.perf_counter() - started
    predictions = [{**r, "prediction": a, "score": score_of(a, r["output"])} for r, a in zip(rows, answers)]
    score = sum(p["score"] for p in predictions) / max(len(predictions), 1)
    return {"task": task or "base", "metric": metric, "score": score, "n": len(predictions),
            "seconds": round(seconds, 2), "max_new_tokens": max_new_tokens,
            "constrained": constrained and task_schema(mt, task) is not None, "predictions": predictions}
