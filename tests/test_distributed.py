"""torchrun data parallelism on CPU: 2 gloo processes train the adapter 1 process does, and resume across sizes."""
import json
import os
import signal

import pytest
import torch

from lora.cli import main
from tests.conftest import finetune_argv, write_task
from tests.test_finetune import adapter_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def assert_same_run(a, b):
    """Same adapter (max abs diff < 1e-5) and the same loss curve, row by row."""
    ta, tb = adapter_tensors(a / "final"), adapter_tensors(b / "final")
    assert ta.keys() == tb.keys()
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) < 1e-5
    ra, rb = rows(a), rows(b)
    assert [(r["step"], "loss" in r) for r in ra] == [(r["step"], "loss" in r) for r in rb]
    for x, y in zip(ra, rb):
        key = "loss" if "loss" in x else "val_loss"
        assert abs(x[key] - y[key]) < 1e-5 * abs(x[key]), (x, y)


@pytest.mark.long
def test_two_gloo_processes_train_the_adapter_of_one_and_resume_with_one(tiny_llama, tmp_path, monkeypatch, capfd):
    # 42 examples, global batch 8: the last batch has 2 examples, so process 1 gets none of it and runs a
    # zero-weight micro-step to take part in the all-reduce; accumulation exercises no_sync.
    task = write_task(tmp_path / "task", n=42)
    common = ("--lora_dropout", 0, "--learning_rate", 1e-2, "--save_steps", 3,
              "--validation_data_path", task / "validation.json")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["finetune", *finetune_argv(tiny_llama, task, one, *common, "--batch_size", 8)]) == 0

    # `lora finetune --nproc_per_node 2` run here: torchrun's agent starts two `python -m lora` processes (from
    # ROOT, this checkout), one thread each, and sets its own signal handlers in this thread: they are put back.
    argv = finetune_argv(tiny_llama, task, two, *common, "--batch_size", 2, "--gradient_accumulation_steps", 2,
                         "--nproc_per_node", 2)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    capfd.readouterr()
    try:
        code = main(["finetune", *argv])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    stderr = capfd.readouterr().err
    assert code == 0, stderr[-3000:]
    assert "in 2 processes" in stderr and stderr.count("Saved adapter to") == 1
    assert_same_run(one, two)
    assert len(rows(one)) == 6 + 1  # six steps and one validation: process 1 wrote nothing

    # The 2-process run's step-3 checkpoint, resumed by 1 process with the same global batch.
    state = torch.load(two / "step-3" / "training_state.pt", weights_only=True)
    assert state["settings"]["global_batch_size"] == 8
    assert main(["finetune", *finetune_argv(tiny_llama, task, two, *common, "--batch_size", 8,
                                            "--load_from_checkpoint", two / "step-3")]) == 0
    assert_same_run(one, two)
