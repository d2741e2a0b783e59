"""The seed's finetune command end to end: training, checkpoints, resume, and every bad input."""
import json
import os
import re
import runpy
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.cli import main
from tests.conftest import finetune_argv, write_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adapter_tensors(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.plots
def test_seed_command_trains_and_loss_goes_down(tiny_llama, task_dir, tmp_path, monkeypatch, capfd):
    """`python finetune.py ...` as the seed's users run it, as __main__ in this process (a fresh process costs
    seconds of imports; test_distributed and serve's test_lifecycle start `python -m lora` ones)."""
    ckpt = tmp_path / "ckpt"
    argv = finetune_argv(tiny_llama, task_dir, ckpt, "--num_epochs", 3, "--learning_rate", 1e-2, "--lora_dropout", 0,
                         "--validation_data_path", task_dir / "validation.json", "--save_steps", 4)
    monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(os.path.join(ROOT, "finetune.py"), run_name="__main__")
    stderr = capfd.readouterr().err
    assert exited.value.code == 0, stderr
    assert {"epoch-1", "epoch-2", "epoch-3", "step-4", "final", "metrics.jsonl", "loss.png"} <= set(os.listdir(ckpt))
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert "validation loss" in stderr and "tok_s" in stderr
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
    task = write_task(tmp_path / "task", targets="c_attn\n")
    assert main(["finetune", *finetune_argv(tiny_gpt2, task, tmp_path / "c", "--max_steps", 2)]) == 0
    assert json.loads((tmp_path / "c" / "final" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("resume_from, flags", [
    ("epoch-1", ()), ("step-3", ()),
    ("step-3", ("--packing", "--max_seq_length", 128, "--batch_size", 2)),  # 48 examples in 17 rows
    ("step-3", ("--group_by_length", "--batch_size", 4, "--gradient_accumulation_steps", 2)),
])
def test_resume_is_bitwise_identical(tiny_llama, task_dir, tmp_path, monkeypatch, resume_from, flags):
    common = ("--num_epochs", 2, "--lora_dropout", 0.1, "--save_steps", 3, "--learning_rate", 5e-3, *flags)
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
    "missing train file": (lambda t: {"--train_data_path": t / "nope.json"}, "data file .*nope.json does not exist"),
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
    "zero alpha": (lambda t: {"--lora_alpha": 0}, "--lora_alpha must be positive"),
    "negative max_steps": (lambda t: {"--max_steps": -1}, "--max_steps must be 0 or more"),
    "negative save_steps": (lambda t: {"--save_steps": -1}, "--save_steps must be 0 or more"),
    "negative eval_steps": (lambda t: {"--eval_steps": -1}, "--eval_steps must be 0 or more"),
    "negative warmup_steps": (lambda t: {"--warmup_steps": -2}, "--warmup_steps must be 0 or more"),
    "early stopping without validation": (lambda t: {"--early_stopping_patience": 2}, "add --validation_data_path"),
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


# ---------------------------------------------------------------- loss, accumulation, memory savers

def rows_of(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def max_diff(a, b):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_accumulation_trains_the_adapter_of_one_big_batch(tiny_llama, task_dir, tmp_path):
    from tests.conftest import make_records
    # Answers of 1 to 4 tokens: micro-batches hold different numbers of target tokens.
    records = make_records(24, 0, "color") + make_records(24, 0, "reverse")
    (task_dir / "train.json").write_text(json.dumps(records))
    common = ("--lora_dropout", 0, "--learning_rate", 1e-2, "--max_steps", 3)
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "big", *common, "--batch_size", 8)]) == 0
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "acc", *common, "--batch_size", 2,
                                            "--gradient_accumulation_steps", 4)]) == 0
    assert max_diff(tmp_path / "big" / "final", tmp_path / "acc" / "final") < 1e-6
    big, acc = rows_of(tmp_path / "big"), rows_of(tmp_path / "acc")
    assert [r["loss"] for r in big] == pytest.approx([r["loss"] for r in acc], rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chunked_loss_equals_the_model_loss_with_its_gradients(request, tiny_tokenizer, kind, monkeypatch):
    import lora.loss
    from lora.data import collate
    from lora.loss import CausalLMLoss, logits_are_head_of_hidden, target_count

    monkeypatch.setattr(lora.loss, "CHUNK_TOKENS", 5)  # several chunks even in a tiny batch
    model, _ = lora.load_model(request.getfixturevalue(f"tiny_{kind}"))
    lora.inject(model, "all-linear", r=4)
    torch.manual_seed(0)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # a trained adapter: the update is not zero
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * (n // 2) + list(range(3 + n // 2, 3 + n))}
                for n in (7, 12, 4)]
    batch = collate(examples, pad_id=0)
    assert logits_are_head_of_hidden(model)

    def loss_and_grads(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora.lora_parameters(model)]

    expected, expected_grads = loss_and_grads(lambda: model(**batch).loss)
    for chunked in (True, False):
        loss, grads = loss_and_grads(lambda chunked=chunked: CausalLMLoss(model, chunked)(batch) / target_count(batch["labels"]))
        assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
        assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, expected_grads))


def test_models_that_soft_cap_logits_keep_the_plain_loss(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from lora.loss import logits_are_head_of_hidden

    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=1.0)
    assert not logits_are_head_of_hidden(Gemma2ForCausalLM(config))


def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama, task_dir, tmp_path):
    common = ("--lora_dropout", 0.1, "--learning_rate", 1e-2, "--max_steps", 2)  # recomputed with the same masks
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "a", *common)]) == 0
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "b", *common,
                                            "--gradient_checkpointing")]) == 0
    assert max_diff(tmp_path / "a" / "final", tmp_path / "b" / "final") < 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_float32_adapters_and_resumes(tiny_llama, task_dir, tmp_path, precision):
    common = ("--mixed_precision", precision, "--learning_rate", 1e-2, "--max_steps", 4, "--save_steps", 2)
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "full", *common)]) == 0
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "fp32", "--learning_rate", 1e-2,
                                            "--max_steps", 4)]) == 0
    final = adapter_tensors(tmp_path / "full" / "final")
    assert all(t.dtype == torch.float32 for t in final.values())
    # Autocast rounds the matmuls, so the run is close to float32's, not equal.
    assert [r["loss"] for r in rows_of(tmp_path / "full")] == pytest.approx(
        [r["loss"] for r in rows_of(tmp_path / "fp32")], rel=0.02)
    state = torch.load(tmp_path / "full" / "step-2" / "training_state.pt", weights_only=True)
    assert ("scaler" in state) == (precision == "fp16")
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "full", *common,
                                            "--load_from_checkpoint", tmp_path / "full" / "step-2")]) == 0
    resumed = adapter_tensors(tmp_path / "full" / "final")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_gradient_clipping_changes_the_update_and_logs_the_norm(tiny_llama, task_dir, tmp_path):
    common = ("--lora_dropout", 0, "--learning_rate", 1e-2, "--max_steps", 2)
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "a", *common, "--max_grad_norm", 0)]) == 0
    assert main(["finetune", *finetune_argv(tiny_llama, task_dir, tmp_path / "b", *common,
                                            "--max_grad_norm", 1e-6)]) == 0
    norms = [r["grad_norm"] for r in rows_of(tmp_path / "a")]
    assert norms[0] == rows_of(tmp_path / "b")[0]["grad_norm"] > 1e-3  # logged before clipping
    assert max_diff(tmp_path / "a" / "final", tmp_path / "b" / "final") > 1e-4


def test_early_stopping_keeps_the_best_adapter(tiny_llama, task_dir, tmp_path, monkeypatch, capsys):
    import lora.train
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr(lora.train, "evaluate_loss", lambda run: (next(losses), 0.0))
    argv = finetune_argv(tiny_llama, task_dir, tmp_path / "c", "--validation_data_path", task_dir / "validation.json",
                         "--eval_steps", 1, "--save_steps", 1, "--early_stopping_patience", 2, "--num_epochs", 2)
    assert main(["finetune", *argv]) == 0
    assert [r["step"] for r in rows_of(tmp_path / "c") if "val_loss" in r] == [1, 2, 3, 4]
    assert max_diff(tmp_path / "c" / "best", tmp_path / "c" / "step-2") == 0
    assert max_diff(tmp_path / "c" / "final", tmp_path / "c" / "step-4") == 0
    assert not os.path.exists(tmp_path / "c" / "best" / "training_state.pt")
    assert "Early stopping" in capsys.readouterr().err


# ---------------------------------------------------------------- resume checks

@pytest.fixture(scope="module")
def two_epochs_run(tiny_llama, tmp_path_factory):
    """A finished run of 2 epochs of 6 steps, validating every 3 steps, with step-6 saved at the end of epoch 1."""
    task = write_task(tmp_path_factory.mktemp("two-epochs") / "task")
    argv = finetune_argv(tiny_llama, task, task.parent / "c", "--validation_data_path", task / "validation.json",
                         "--eval_steps", 3, "--save_steps", 6, "--num_epochs", 2)
    assert main(["finetune", *argv]) == 0
    return argv, task.parent / "c"


@pytest.fixture
def two_epochs(two_epochs_run, tmp_path):
    """The finished run's argv, its checkpoint folder copied to tmp_path / "c" for this test to resume into."""
    argv, folder = two_epochs_run
    shutil.copytree(folder, tmp_path / "c")
    return [str(tmp_path / "c") if a == str(folder) else a for a in argv]


@pytest.mark.parametrize("flags, message", [
    (("--lora_rank", 4), "trained with --lora_rank 8, not 4"),
    (("--lora_alpha", 32), "trained with --lora_alpha 16, not 32"),
    (("--target_modules_path", "TARGETS"), "selects other modules than"),
])
def test_resume_refuses_settings_a_checkpoint_cannot_take(two_epochs, tmp_path, capsys, flags, message):
    (tmp_path / "targets.txt").write_text("q_proj\nk_proj\nv_proj\n")
    flags = [str(tmp_path / "targets.txt") if f == "TARGETS" else f for f in flags]
    argv = dict(zip(two_epochs[::2], two_epochs[1::2])) | dict(zip(flags[::2], map(str, flags[1::2])))
    argv["--load_from_checkpoint"] = str(tmp_path / "c" / "step-6")
    assert main(["finetune", *[x for pair in argv.items() for x in pair], "--allow_changed_settings"]) == 2
    assert message in capsys.readouterr().err


def test_resume_with_changed_settings_needs_allow_changed_settings(two_epochs, tmp_path, capsys):
    argv = [*two_epochs, "--load_from_checkpoint", str(tmp_path / "c" / "step-6"), "--batch_size", "4", "--seed", "7"]
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err
    assert "global batch size" in err and "was 8, now 4" in err and "--seed was 42, now 7" in err
    assert "--allow_changed_settings" in err
    assert main(["finetune", *argv, "--allow_changed_settings"]) == 0
    assert "warning: resuming with changed settings" in capsys.readouterr().err


def test_resume_at_the_end_of_an_epoch_writes_no_duplicate_validation(two_epochs, tmp_path):
    assert main(["finetune", *two_epochs, "--load_from_checkpoint", str(tmp_path / "c" / "step-6")]) == 0
    rows = rows_of(tmp_path / "c")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6, 9, 12]


def test_max_seq_length_past_the_models_context_is_capped(tiny_llama, tmp_path, capsys):
    task = write_task(tmp_path / "task")
    long = [{"instruction": "Repeat the words.", "input": "", "output": " ".join(["apple river"] * 200)}] * 4
    (task / "train.json").write_text(json.dumps(long))
    argv = finetune_argv(tiny_llama, task, tmp_path / "c", "--max_seq_length", 1000, "--max_steps", 1)
    assert main(["finetune", *argv]) == 0
    err = capsys.readouterr().err
    assert "past the model's context of 256 positions; using 256" in err


def test_library_finetune_takes_a_config_and_leaves_it_as_given(tiny_llama, task_dir, tmp_path):
    config = lora.finetune_args(model_name_or_path=tiny_llama, target_modules_path=task_dir / "target_modules.txt",
                                prompt_format_path=task_dir / "prompt_format.txt",
                                train_data_path=task_dir / "train.json", checkpoint_dir=tmp_path / "c",
                                device="cpu", max_steps=1, max_seq_length=1000)
    final = lora.finetune(config)
    assert final == str(tmp_path / "c" / "final")
    assert config.max_seq_length == 1000 and config.evaluate is None  # the run's own copy was capped, not this one
    training_args = json.loads((tmp_path / "c" / "final" / "lora_task.json").read_text())["training_args"]
    assert training_args["max_seq_length"] == 256 and training_args["evaluate"] is False
    assert training_args["train_data_path"] == str(task_dir / "train.json")


def test_library_settings_of_the_wrong_name_or_type_are_refused(tiny_llama, task_dir, tmp_path):
    required = {"model_name_or_path": tiny_llama, "target_modules_path": task_dir / "target_modules.txt",
                "train_data_path": task_dir / "train.json"}
    with pytest.raises(TypeError, match="unknown finetune argument 'lora_r'"):
        lora.finetune_args(**required, lora_r=8)
    with pytest.raises(TypeError, match="needs train_data_path"):
        lora.finetune_args(model_name_or_path=tiny_llama, target_modules_path=task_dir / "target_modules.txt")
    for field, value, message in (("lora_rank", "8", "--lora_rank must be int, got '8'"),
                                  ("packing", 1, "--packing must be bool, got 1"),
                                  ("lr_scheduler", "step", "--lr_scheduler must be one of linear, cosine"),
                                  ("learning_rate", float("nan"), "--learning_rate must be 0 or more, got nan")):
        with pytest.raises(lora.LoraError, match=re.escape(message)):
            lora.finetune(lora.finetune_args(**required, checkpoint_dir=tmp_path / "c", **{field: value}))
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- a damaged training state

@pytest.fixture(scope="module")
def one_step(tiny_llama, tmp_path_factory):
    """A finished 2-step run whose step-1/ holds a training state, and the flags that trained it."""
    folder = tmp_path_factory.mktemp("one_step")
    argv = finetune_argv(tiny_llama, write_task(folder / "task"), folder / "c", "--max_steps", 2, "--save_steps", 1)
    assert main(["finetune", *argv]) == 0
    return argv, folder / "c" / "step-1"


@pytest.mark.parametrize("change, message", [
    ({"examples_done": -8}, "examples_done must be a whole number (0 or more), got -8"),
    ({"step": -1}, "step must be a whole number (0 or more), got -1"),
    ({"epoch": 1.5}, "epoch must be a whole number (0 or more), got 1.5"),
    ({"optimizer": None}, "has no optimizer"),
    ({"scheduler": "linear"}, "scheduler must be a scheduler state_dict"),
    ({"optimizer": {"state": {}, "param_groups": []}}, "field 'optimizer' does not fit this run"),
])
def test_a_tampered_training_state_is_refused_naming_file_and_field(one_step, tmp_path, capsys, change, message):
    argv, step_1 = one_step
    shutil.copytree(step_1, tmp_path / "ckpt")
    state_path = tmp_path / "ckpt" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    state.update(change)
    torch.save({k: v for k, v in state.items() if v is not None}, state_path)
    resume = ["--load_from_checkpoint", str(tmp_path / "ckpt"), "--checkpoint_dir", str(tmp_path / "out")]
    assert main(["finetune", *argv, *resume]) == 2
    err = capsys.readouterr().err
    assert str(state_path) in err and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert not (tmp_path / "out" / "final").exists()


# ---------------------------------------------------------------- chat data

def write_chat_task(folder, model_path, tokenizer, n=48):
    """OpenAI-style chat data, and a copy of the model whose tokenizer has a chat template."""
    from tests.conftest import make_records
    folder.mkdir(parents=True)
    model_dir = folder / "model"
    shutil.copytree(model_path, model_dir)
    tokenizer.save_pretrained(model_dir)
    chats = [{"messages": [{"role": "system", "content": "Answer with one word."},
                           {"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in make_records(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (folder / "target_modules.txt").write_text("q_proj\nv_proj\n")
    return model_dir


def test_chat_data_trains_with_packing_and_records_the_chat_template(tiny_llama, chat_tokenizer, tmp_path):
    model = write_chat_task(tmp_path / "chat", tiny_llama, chat_tokenizer)
    argv = ["--model_name_or_path", model, "--target_modules_path", tmp_path / "chat" / "target_modules.txt",
            "--train_data_path", tmp_path / "chat" / "train.jsonl", "--checkpoint_dir", tmp_path / "c",
            "--device", "cpu", "--packing", "--max_seq_length", 128, "--batch_size", 2, "--num_epochs", 4,
            "--learning_rate", 2e-2, "--lora_dropout", 0]
    assert main(["finetune", *map(str, argv)]) == 0  # no --prompt_format_path: chat data needs none
    losses = [r["loss"] for r in rows_of(tmp_path / "c")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    task = json.loads((tmp_path / "c" / "final" / "lora_task.json").read_text())
    assert task["chat_template"] is True and task["data_format"] == "messages"
    assert task["system_prompt"] == "Answer with one word."
    assert "prompt_format" not in task


def test_alpaca_data_without_a_prompt_format_names_the_flag(tiny_llama, task_dir, tmp_path, capsys):
    argv = finetune_argv(tiny_llama, task_dir, tmp_path / "c")
    i = argv.index("--prompt_format_path")
    assert main(["finetune", *argv[:i], *argv[i + 2:]]) == 2
    assert "pass --prompt_format_path" in capsys.readouterr().err
