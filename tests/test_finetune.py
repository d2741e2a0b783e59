"""The seed's finetune command end to end: training, checkpoints, resume, and every bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.cli import main
from tests.conftest import finetune_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adapter_tensors(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_seed_command_trains_and_loss_goes_down(tiny_llama, task_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = finetune_argv(tiny_llama, task_dir, ckpt, "--num_epochs", 3, "--learning_rate", 1e-2, "--lora_dropout", 0,
                         "--validation_data_path", task_dir / "validation.json", "--save_steps", 4)
    result = subprocess.run([sys.executable, "finetune.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {"epoch-1", "epoch-2", "epoch-3", "step-4", "final", "metrics.jsonl", "loss.png"} <= set(os.listdir(ckpt))
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert "validation loss" in result.stderr and "tok_s" in result.stderr
    task = json.loads((ckpt / "final" / "lora_task.json").read_text())
    assert task["prompt_format"] == (task_dir / "prompt_format.txt").read_text()
    assert task["training_args"]["num_epochs"] == 3


def test_validation_every_eval_steps_after_each_epoch_and_where_max_steps_stops(tiny_llama, task_dir, tmp_path):
    argv = finetune_argv(tiny_llama, task_dir, tmp_path / "c", "--num_epochs", 2, "--max_steps", 9, "--eval_steps", 4,
                         "--validation_data_path", task_dir / "validation.json")  # 48 examples: 6 steps an epoch
    assert main(["finetune", *argv]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 6, 8, 9]


def test_gpt2_and_lora_cli_entry_point(tiny_gpt2, tmp_path):
    from tests.conftest import write_task
    task = write_task(tmp_path / "task", targets="c_attn\n")
    assert main(["finetune", *finetune_argv(tiny_gpt2, task, tmp_path / "c", "--max_steps", 2)]) == 0
    assert json.loads((tmp_path / "c" / "final" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("resume_from", ["epoch-1", "step-3"])
def test_resume_is_bitwise_identical(tiny_llama, task_dir, tmp_path, monkeypatch, resume_from):
    common = ("--num_epochs", 2, "--lora_dropout", 0.1, "--save_steps", 3, "--learning_rate", 5e-3)
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "full", *common)]) == 0

    import lora.train
    real_save = lora.train.save_adapter

    def save_then_die(model, path, *args, **kwargs):  # the run is killed right after this checkpoint
        real_save(model, path, *args, **kwargs)
        if os.path.basename(path) == resume_from:
            raise KeyboardInterrupt
    monkeypatch.setattr(lora.train, "save_adapter", save_then_die)
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "cut", *common)]) == 130
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "cut" / "final")
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "cut", *common,
                                            "--load_from_checkpoint", tmp_path / "cut" / resume_from)]) == 0
    full, resumed = adapter_tensors(tmp_path / "full" / "final"), adapter_tensors(tmp_path / "cut" / "final")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    rows = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # no duplicated steps in the log


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing train file": (lambda t: {"--train_data_path": t / "nope.json"}, "cannot read data file"),
    "malformed JSON": (lambda t: {"--train_data_path": write(t / "bad.json", '[{"instruction": "a", "output": "b"},\n{oops}]')},
                       "not valid JSON: .* line 2"),
    "malformed JSONL": (lambda t: {"--train_data_path": write(t / "bad.jsonl", '{"instruction": "a", "output": "b"}\nnot json\n')},
                        "line 2 is not valid JSON"),
    "record missing output": (lambda t: {"--train_data_path": write(t / "no_out.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))},
                              "record 2 has no string 'output'"),
    "empty dataset": (lambda t: {"--train_data_path": write(t / "empty.json", "[]")}, "holds no examples"),
    "unknown placeholder": (lambda t: {"--prompt_format_path": write(t / "p.txt", "{instruction} {context}")},
                            r"unknown placeholder\(s\) \{context\}"),
    "no instruction placeholder": (lambda t: {"--prompt_format_path": write(t / "p.txt", "{input}")}, "no {instruction}"),
    "targets match nothing": (lambda t: {"--target_modules_path": write(t / "tm.txt", "c_attn\n")}, "match nothing"),
    "missing model": (lambda t: {"--model_name_or_path": t / "no-model"}, "not a folder here"),
    "zero rank": (lambda t: {"--lora_rank": 0}, "--lora_rank must be positive"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_message(tiny_llama, task_dir, tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    argv = finetune_argv(tiny_llama, task_dir, tmp_path / "ckpt", "--max_steps", 1)
    flags = {**dict(zip(argv[::2], argv[1::2])), **{k: str(v) for k, v in make(tmp_path).items()}}
    assert main(["finetune", *[x for pair in flags.items() for x in pair]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "ckpt" / "final")


def test_resume_from_checkpoint_of_another_base_is_refused(tiny_llama, other_llama, task_dir, tmp_path, capsys):
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "a", "--max_steps", 1)]) == 0
    argv = finetune_argv(other_llama, task_dir, tmp_path / "b", "--load_from_checkpoint", tmp_path / "a" / "final")
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err
    assert "trained on base model" in err and str(tiny_llama) in err and str(other_llama) in err


def test_debug_flag_shows_the_traceback(tiny_llama, task_dir, tmp_path):
    argv = finetune_argv(tiny_llama, task_dir, tmp_path / "c", "--train_data_path", tmp_path / "nope.json")
    with pytest.raises(lora.LoraError):
        main(["finetune", *argv, "--debug"])
