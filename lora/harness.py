"""lm-evaluation-harness against `lora serve`: a task's test set as an offline lm-eval task, and the run.

lm-eval's `local-completions` model scores loglikelihood tasks from /v1/completions with `echo`, `logprobs`
and prompts given as token ids, which `lora serve` answers (see lora.logprobs). Its built-in tasks download
their data sets, so offline only tasks whose data is on disk run: an Alpaca test set (the example tasks'
test.json) becomes one here, scoring the loglikelihood of each expected output given the task's prompt.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from .data import load_records
from .engine import Engine
from .errors import LoraError
from .multitask import MultiTaskModel


def lm_eval_module() -> Any:
    """lm_eval, or a LoraError saying how to get it (an optional extra)."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise LoraError("--lm-eval needs lm-evaluation-harness: pip install 'lora-pytorch[lmeval]' "
                        "(lm-eval 0.4.x)") from None
    return lm_eval


def custom_task(mt: MultiTaskModel, task: str | None, records_path: str, folder: str, name: str) -> str:
    """Write lm-eval task `name` (name.yaml, name.jsonl in folder) from an Alpaca test set; returns its name.

    Each document is the task's prompt for a record (as `lora serve` renders it for that task) as the context,
    and the record's output as the continuation: a loglikelihood task (metrics: perplexity and acc, whether the
    output is the greedy continuation). Its data is a local file, so it runs offline.
    """
    tokenizer: Any = mt.tokenizer
    rows = []
    for r in load_records(records_path):
        ids = mt.prompt_ids({"downstream": task, "instruction": r["instruction"], "input": r.get("input", "")})
        rows.append({"context": tokenizer.decode(ids), "target": r["output"]})
    if not rows:
        raise LoraError(f"{records_path} holds no records to evaluate")
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
              "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "context",
              "doc_to_target": "target", "target_delimiter": "",
              "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                              {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1}}
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)  # JSON is YAML
    return name


def run_lm_eval(base_url: str, model: str, tokenizer_path: str, tasks: list[str], include_path: str | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's local-completions over `tasks` against a `lora serve` at base_url, as served model `model`
    (a task's name, or the base model's). Returns lm-eval's results dict ("results", "samples", ...)."""
    lm_eval = lm_eval_module()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing downloads: only tasks whose data is on disk run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Indexing lm-eval's own tasks parses thousands of YAML files (tens of seconds): only when one is asked for.
    manager = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = lm_eval.tasks.TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LoraError(f"lm-eval knows no task {unknown[0]!r}; give an lm-eval task name or an Alpaca test set file")
    model_args = {"base_url": f"{base_url.rstrip('/')}/v1/completions", "model": model,
                  "tokenizer_backend": "huggingface", "tokenizer": tokenizer_path, "tokenized_requests": True,
                  "batch_size": batch_size, "max_retries": 1}
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=tasks,
                                      task_manager=manager, limit=limit, log_samples=True)
    if results is None:
        raise LoraError("lm-eval returned no results")
    return dict(results)


def served_base_model(base_url: str) -> str:
    """The base model's name at a running `lora serve`: the first of its /v1/models."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/v1/models", timeout=30) as answer:
            return str(json.load(answer)["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise LoraError(f"could not list the models of {base_url} ({e}); is `lora serve` running there?") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI app (create_app's) on a free local port in a thread; yields its base URL."""
    import uvicorn  # the serve extra, which create_app needed already

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="lora-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LoraError("the local server for lm-eval did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def tokenizer_folder(mt: MultiTaskModel, folder: str) -> str:
    """The base model's tokenizer saved in folder/tokenizer, for lm-eval to count context tokens with."""
    path = os.path.join(folder, "tokenizer")
    tokenizer: Any = mt.tokenizer
    tokenizer.save_pretrained(path)
    return path


def evaluate_with_lm_eval(mt: MultiTaskModel, task: str | None, names: list[str], *, base_url: str | None = None,
                          served_model_name: str = "base", limit: int | None = None) -> dict:
    """`lora eval --lm-eval`: each name is an lm-eval task, or an Alpaca test set file (turned into one).

    With base_url, against that running `lora serve`; else against one started here over `mt`.
    Returns {"task", "results": {lm-eval task: metrics}, "samples": {lm-eval task: per-document records}}.
    """
    with tempfile.TemporaryDirectory(prefix="lora-lm-eval-") as folder:
        tasks = []
        for name in names:
            if os.path.isfile(name):
                stem = os.path.splitext(os.path.basename(name))[0]
                tasks.append(custom_task(mt, task, name, folder, f"lora_{task or 'base'}_{stem}".replace("-", "_")))
            else:
                tasks.append(name)
        tokenizer = tokenizer_folder(mt, folder)
        if base_url is not None:
            model = task or served_base_model(base_url)
            results = run_lm_eval(base_url, model, tokenizer, tasks, folder, limit)
        else:
            from .serve import create_app  # the serve extra: only when no server is given

            app = create_app(mt, Engine(mt), served_model_name=served_model_name)
            with serving(app) as url:
                results = run_lm_eval(url, task or served_model_name, tokenizer, tasks, folder, limit)
    return {"task": task or "base", "results": results.get("results", {}), "samples": results.get("samples", {})}
