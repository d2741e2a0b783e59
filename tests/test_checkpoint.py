"""The PEFT on-disk format both ways, atomic writes, and checkpoints that must be refused."""
import errno
import json
import math
import os
import shutil
import signal
import time

import pytest
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lora
from lora import atomic, checkpoint
from lora.files import OutsideRootError

IDS = torch.tensor([[5, 9, 2, 7, 11, 3, 8]])


def randomized(model, seed=0):
    """Non-zero B so the adapter really changes the output."""
    torch.manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    return model


@pytest.mark.parametrize("fixture, targets", [("tiny_llama", ["q_proj", "v_proj"]), ("tiny_llama", "all-linear"),
                                              ("tiny_gpt2", ["c_attn", "c_proj", "wte"])])
def test_peft_loads_our_checkpoint_with_same_logits(request, tmp_path, fixture, targets):
    path = request.getfixturevalue(fixture)
    model = lora.load_model(path)[0]
    lora.inject(model, targets, r=4, alpha=8, rslora=True)
    randomized(model)
    ours = model(IDS).logits
    lora.save_adapter(model, tmp_path / "ckpt", base_model_name_or_path=path)
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    from peft import PeftModel  # here, not at the top: importing PEFT (and bitsandbytes) costs every worker a second
    peft_model = PeftModel.from_pretrained(lora.load_model(path)[0], tmp_path / "ckpt")
    assert (peft_model(IDS).logits - ours).abs().max() < 1e-4


@pytest.mark.parametrize("fixture, peft_config", [
    ("tiny_llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    ("tiny_llama", dict(target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3})),
    ("tiny_gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True)),
    ("tiny_gpt2", dict(target_modules=["wte", "c_attn"], r=2, lora_alpha=4)),
])
def test_we_load_peft_checkpoints_with_same_logits(request, tmp_path, fixture, peft_config):
    from peft import LoraConfig, get_peft_model  # see above
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    peft_model = get_peft_model(lora.load_model(path)[0], LoraConfig(init_lora_weights=False, **peft_config))
    expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    model = lora.load_model(path)[0]
    lora.load_adapter(model, tmp_path / "peft")
    assert (model(IDS).logits - expected).abs().max() < 1e-4
    # ...and the MultiTaskModel's merged path agrees too (except on a tied embedding, which it refuses).
    base, tok = lora.load_model(path)
    mt = lora.MultiTaskModel(base, {"t": tmp_path / "peft"}, tokenizer=tok)
    if "wte" in peft_config["target_modules"]:
        with pytest.raises(lora.LoraError, match="tied to the output head"):
            mt.activate("t")
        return
    with mt.apply_downstream("t") as merged:
        assert (merged(IDS).logits - expected).abs().max() < 1e-4


def test_checkpoint_is_small_and_has_task_metadata(tiny_llama, tmp_path):
    model = lora.load_model(tiny_llama)[0]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lora.inject(model, ["q_proj", "v_proj"], r=2)
    lora.save_adapter(model, tmp_path / "a", task={"prompt_format": "Q: {instruction}\nA: "})
    task = json.loads((tmp_path / "a" / "lora_task.json").read_text())
    assert task["prompt_format"] == "Q: {instruction}\nA: "
    assert set(task["base_fingerprint"]["shapes"]) == set(lora.lora_layers(model))
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors", "lora_task.json"]
    # A tiny model's r / hidden is large, so 5% is generous.
    assert os.path.getsize(tmp_path / "a" / "adapter_model.safetensors") < 0.05 * base_bytes


def test_save_is_atomic_when_interrupted(tiny_llama, tmp_path, monkeypatch):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    lora.save_adapter(model, tmp_path / "ckpt")
    before = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    randomized(model)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        lora.save_adapter(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["ckpt"]  # no half-written folder left behind
    after = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def saved(tiny_llama, tmp_path, name="ckpt"):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj", "v_proj"])
    randomized(model)
    return lora.save_adapter(model, tmp_path / name)


def test_refuses_nan_truncated_pickled_and_foreign_checkpoints(tiny_llama, other_llama, tiny_gpt2, tmp_path):
    path = saved(tiny_llama, tmp_path)
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)

    key = next(iter(tensors))
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, weights)
    with pytest.raises(lora.LoraError, match="NaN or Inf"):
        lora.read_adapter(path)

    save_file(tensors, weights)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(lora.LoraError, match="corrupt or truncated"):
        lora.read_adapter(path)

    os.remove(weights)
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    with pytest.raises(lora.LoraError, match="pickle"):
        lora.read_adapter(path)

    with pytest.raises(lora.LoraError, match="does not exist"):
        lora.read_adapter(tmp_path / "missing")

    good = saved(tiny_llama, tmp_path, "good")
    with pytest.raises(lora.LoraError, match="trained on base model .* not on the loaded"):
        lora.load_adapter(lora.load_model(other_llama)[0], good)
    with pytest.raises(lora.LoraError, match="has no module"):
        lora.load_adapter(lora.load_model(tiny_gpt2)[0], good)


def test_fingerprint_matches_across_dtypes(tiny_llama, other_llama, tmp_path):
    """The same base loaded in bfloat16 or float16 is accepted; another base of the same shapes is not, in any dtype."""
    path = saved(tiny_llama, tmp_path)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = lora.load_model(tiny_llama, dtype=dtype)[0]
        adapter = lora.load_adapter(model, path)
        assert set(lora.lora_layers(model)) == set(adapter.modules)
        with pytest.raises(lora.LoraError, match="the weights of .* differ from those the adapter was trained on"):
            lora.load_adapter(lora.load_model(other_llama, dtype=dtype)[0], path)


# ---------------------------------------------------------------- every field of a checkpoint is checked

@pytest.fixture(scope="module")
def good_checkpoint(tiny_llama, tmp_path_factory):
    return saved(tiny_llama, tmp_path_factory.mktemp("good"))


def edited_copy(source, tmp_path, file, edit):
    """A copy of a checkpoint with one file rewritten: edit(parsed JSON) -> new object, or raw text."""
    path = shutil.copytree(source, tmp_path / "edited")
    obj = edit(json.loads((path / file).read_text()))
    (path / file).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


CONFIG, TASK = "adapter_config.json", "lora_task.json"
BAD_FIELDS = [
    (CONFIG, lambda c: {**c, "lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
    (CONFIG, lambda c: json.dumps({**c, "lora_alpha": 0}).replace('"lora_alpha": 0', '"lora_alpha": 1e999'),
     "lora_alpha must be a finite number, got inf"),
    (CONFIG, lambda c: {**c, "lora_alpha": "16"}, "lora_alpha must be a finite number, got '16'"),
    (CONFIG, lambda c: {**c, "lora_alpha": None}, "lora_alpha must be a finite number, got None"),
    (CONFIG, lambda c: {**c, "lora_alpha": True}, "lora_alpha must be a finite number, got True"),
    (CONFIG, lambda c: {**c, "lora_alpha": 1e300}, "lora_alpha 1e.300 gives .* a scale .* past float32's range"),
    (CONFIG, lambda c: {**c, "r": "8"}, "r must be a positive integer, got '8'"),
    (CONFIG, lambda c: {**c, "r": 0}, "r must be a positive integer, got 0"),
    (CONFIG, lambda c: {**c, "r": 16}, "has rank 8, but .*adapter_config.json gives it r=16"),
    (CONFIG, lambda c: {**c, "alpha_pattern": ["q_proj", 4]}, "alpha_pattern must be an object .* not list"),
    (CONFIG, lambda c: {**c, "alpha_pattern": {"q_proj": "4"}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    (CONFIG, lambda c: {**c, "alpha_pattern": {"q_proj(": 4}}, "alpha_pattern key 'q_proj\\(' is not a valid regex"),
    (CONFIG, lambda c: {**c, "rank_pattern": {"v_proj": -2}},
     r"rank_pattern\['v_proj'\] must be a positive integer, got -2"),
    (CONFIG, lambda c: {**c, "alpha_pattern": {f"layers\\.{i}\\.q_proj": 4 for i in range(5000)}},
     "alpha_pattern has 5,000 keys, more than the 4,096 allowed"),
    (CONFIG, lambda c: {**c, "use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
    (CONFIG, lambda c: {**c, "target_modules": 7}, "target_modules must be a list of module names"),
    (CONFIG, lambda c: {**c, "lora_dropout": 2}, "lora_dropout must be a number from 0 to 1"),
    (CONFIG, lambda c: {**c, "bias": "all"}, r"uses trained biases \(bias='all'\)"),
    (CONFIG, lambda c: {**c, "use_dora": True}, "uses DoRA"),
    (CONFIG, lambda c: {**c, "peft_type": "IA3"}, "describes a 'IA3' adapter"),
    (CONFIG, lambda c: [c], "must be a JSON object of LoRA settings, not list"),
    (CONFIG, lambda c: '{"r": [[[[' * 20000, "is not valid JSON"),
    (TASK, lambda t: [t], "must be a JSON object of task metadata, not list"),
    (TASK, lambda t: {**t, "prompt_format": 5}, "prompt_format must be a string or null, got 5"),
    (TASK, lambda t: {**t, "prompt_format": "Answer: {input}"}, "prompt_format has no {instruction} placeholder"),
    (TASK, lambda t: {**t, "format_version": 99}, "format_version 99, newer than"),
    (TASK, lambda t: {**t, "data_format": "csv"}, "data_format must be one of alpaca, messages, sharegpt"),
    (TASK, lambda t: {**t, "base_fingerprint": {"shapes": ["q_proj"]}},
     "base_fingerprint.shapes must map module names"),
    (TASK, lambda t: {**t, "training_args": "lr=1"}, "training_args must be an object or null"),
]


@pytest.mark.parametrize("file, edit, message", BAD_FIELDS)
def test_bad_fields_are_refused_naming_file_and_field(good_checkpoint, tmp_path, file, edit, message):
    path = edited_copy(good_checkpoint, tmp_path, file, edit)
    with pytest.raises(lora.LoraError, match=message) as error:
        lora.read_adapter(path)
    assert f"{path}/{file}" in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_quantized_or_integer_weights_are_refused(good_checkpoint, tmp_path, dtype):
    path = shutil.copytree(good_checkpoint, tmp_path / "quantized")
    weights = path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(lora.LoraError, match=f"adapter_model.safetensors: .* is {str(dtype)[6:]}; LoRA weights must"):
        lora.read_adapter(path)


def test_every_file_is_read_inside_the_root(good_checkpoint, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(good_checkpoint, root / "a")
    shutil.copytree(good_checkpoint, outside)
    assert lora.read_adapter(root / "a", root=root).modules
    os.remove(root / "a" / "adapter_model.safetensors")
    os.symlink(outside / "adapter_model.safetensors", root / "a" / "adapter_model.safetensors")
    with pytest.raises(OutsideRootError, match="adapter_model.safetensors is a symbolic link"):
        lora.read_adapter(root / "a", root=root)
    with pytest.raises(OutsideRootError):
        lora.read_adapter(outside, root=root)
    os.mkfifo(root / "fifo")
    os.mkdir(root / "b")
    os.symlink("../fifo", root / "b" / "adapter_config.json")
    with pytest.raises(OutsideRootError, match="symbolic link"):
        lora.read_adapter(root / "b", root=root)


# ---------------------------------------------------------------- overwrites and full disks

def kill_during_save(model, path, point, after=True):
    """save_adapter in a forked child that dies like kill -9 (no cleanup runs) just before/after `point` runs."""
    pid = os.fork()
    if pid == 0:
        try:
            owner, name = point.rsplit(".", 1)
            target = {"atomic": atomic, "os": os}[owner]
            real = getattr(target, name)

            def dying(*args, **kwargs):
                if after:
                    real(*args, **kwargs)
                os._exit(0)
            setattr(target, name, dying)
            lora.save_adapter(model, path)
        finally:
            os._exit(1)  # the save finished without reaching `point`
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def weights_of(path):
    return lora.read_adapter(path).modules["model.layers.0.self_attn.q_proj"].B


@pytest.mark.skipif(not hasattr(os, "fork") or not atomic.HAS_EXCHANGE, reason="needs fork and renameat2")
@pytest.mark.parametrize("point, after, holds", [("atomic.exchange", False, "old"),
                                                 ("atomic.exchange", True, "new"),
                                                 ("atomic.remove_path", False, "new"),
                                                 ("atomic.fsync_dir", True, "old")])
def test_killed_overwrite_leaves_one_complete_checkpoint_under_the_name(tiny_llama, tmp_path, point, after, holds):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    path = lora.save_adapter(model, tmp_path / "step-120")
    old = weights_of(path)
    new = randomized(model).model.layers[0].self_attn.q_proj.lora_B.detach().clone()
    kill_during_save(model, path, point, after)
    assert torch.equal(weights_of(path), {"old": old, "new": new}[holds])
    assert len(os.listdir(tmp_path)) == 2  # the name, plus the hidden copy the killed run left
    lora.save_adapter(model, tmp_path / "step-130")  # the next save in the folder removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["step-120", "step-130"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_without_exchange_a_run_killed_between_renames_gets_its_checkpoint_back(tiny_llama, tmp_path, monkeypatch):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    path = lora.save_adapter(model, tmp_path / "step-120")
    old = weights_of(path)
    randomized(model)

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "not supported by this filesystem")
    monkeypatch.setattr(atomic, "exchange", no_exchange)
    lora.save_adapter(model, path)  # the fallback overwrites correctly...
    assert not torch.equal(weights_of(path), old) and os.listdir(tmp_path) == ["step-120"]
    kill_during_save(model, path, "os.rename", after=True)  # ...and a kill between its two renames
    assert not os.path.exists(path)
    lora.save_adapter(model, tmp_path / "step-130")
    assert sorted(os.listdir(tmp_path)) == ["step-120", "step-130"]
    assert lora.read_adapter(path).modules


TORCH_DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_DISK_FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer, error", [("torch.save", TORCH_DISK_FULL),
                                           ("lora.checkpoint.save_file", SAFETENSORS_DISK_FULL),
                                           ("lora.checkpoint.write_json", OSError(errno.ENOSPC, "No space left"))])
def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_llama, tmp_path, monkeypatch, writer, error):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    path = lora.save_adapter(model, tmp_path / "ckpt", training_state={"step": torch.tensor(1)})
    old = weights_of(path)
    randomized(model)

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(writer, full)
    with pytest.raises(lora.LoraError, match=f"disk full while writing {path}; free space or pass another "
                                             "--checkpoint_dir"):
        lora.save_adapter(model, path, training_state={"step": torch.tensor(2)})
    assert torch.equal(weights_of(path), old) and os.listdir(tmp_path) == ["ckpt"]


def test_only_leftovers_of_dead_saves_are_removed(good_checkpoint, tiny_llama, tmp_path):
    """A hidden copy is removed only if its name carries the PID of a process that is gone; the rest is kept."""
    dead = 2 ** 22 + 1  # above Linux's largest PID: no such process
    shutil.copytree(good_checkpoint, tmp_path / f".step-110.tmp-{dead}-0qz81mfe")
    shutil.copytree(good_checkpoint, tmp_path / f".step-120.old-{dead}-k2j4x_9a")  # the fallback's moved-aside copy
    shutil.copytree(good_checkpoint, tmp_path / f".step-125.tmp-{os.getpid()}-abcd1234")  # a save still running
    for kept in (".notes.tmp-dir", ".step-100.tmp-0qz81mfe", ".step-100.old-k2j4x_9a"):  # not ours
        (tmp_path / kept).mkdir()
    saved(tiny_llama, tmp_path, "step-130")
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp-dir", ".step-100.old-k2j4x_9a", ".step-100.tmp-0qz81mfe",
                                            f".step-125.tmp-{os.getpid()}-abcd1234", "step-120", "step-130"]
    assert torch.equal(weights_of(tmp_path / "step-120"), weights_of(good_checkpoint))


def test_training_state_is_read_safely(good_checkpoint, tmp_path):
    path = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    assert checkpoint.load_training_state(path) is None  # none saved: a fresh run from these weights
    torch.save([torch.zeros(2)], path / "training_state.pt")
    with pytest.raises(lora.LoraError, match="training_state.pt holds a list, not a training state"):
        checkpoint.load_training_state(path)
    os.remove(path / "training_state.pt")
    os.mkfifo(path / "training_state.pt")
    with pytest.raises(lora.LoraError, match="training_state.pt is a named pipe"):
        checkpoint.load_training_state(path)


# ---------------------------------------------------------------- hardening: scales, regexes, overwrites, resume state

def test_scale_past_float32_is_refused_naming_file_and_field(good_checkpoint, tmp_path):
    """alpha / r = 1e39 with tiny A and B passes the update bound but is Inf in float32: refused at load."""
    path = shutil.copytree(good_checkpoint, tmp_path / "huge")
    weights = path / "adapter_model.safetensors"
    save_file({k: v * 1e-30 for k, v in load_file(weights).items()}, weights)
    config = json.loads((path / CONFIG).read_text())
    for edit, field in (({"lora_alpha": 8e39}, "lora_alpha"),
                        ({"alpha_pattern": {"q_proj": 8e39}}, r"alpha_pattern\['q_proj'\]"),
                        ({"lora_alpha": 3e39, "use_rslora": True}, "lora_alpha")):
        (path / CONFIG).write_text(json.dumps({**config, **edit}))
        with pytest.raises(lora.LoraError, match=f"{path}/{CONFIG}: {field} .* past float32's range"):
            lora.read_adapter(path)
    # A scale float32 holds whose update still overflows is refused too.
    original = load_file(os.path.join(good_checkpoint, "adapter_model.safetensors"))
    save_file({k: v * 1e1 for k, v in original.items()}, weights)
    (path / CONFIG).write_text(json.dumps({**config, "lora_alpha": 8e37}))
    with pytest.raises(lora.LoraError, match="makes the update overflow float32"):
        lora.read_adapter(path)


def finishes_within(seconds, fn):
    """fn() in a forked child; True if it returned within `seconds` (a regex stuck in C cannot be interrupted)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    for _ in range(int(seconds * 20)):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_catastrophic_patterns_are_matched_in_bounded_time(good_checkpoint, tiny_llama, tmp_path):
    path = edited_copy(good_checkpoint, tmp_path, CONFIG, lambda c: {**c, "alpha_pattern": {"(.*.*)*Z": 4}})
    assert finishes_within(1, lambda: lora.read_adapter(path))  # Python's re takes hours on these names
    model = lora.load_model(tiny_llama)[0]

    def inject_evil():
        with pytest.raises(lora.LoraError, match="match nothing"):
            lora.inject(model, ["(.*.*)*Z"])
    assert finishes_within(1, inject_evil)


def test_peft_style_regexes_work_and_unboundable_ones_are_refused(good_checkpoint, tiny_llama, tmp_path):
    model = lora.load_model(tiny_llama)[0]
    names = lora.inject(model, [r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r".*\.o_proj"], r=2)
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["o_proj", "o_proj", "q_proj", "q_proj", "v_proj", "v_proj"]
    path = edited_copy(good_checkpoint, tmp_path, CONFIG, lambda c: {**c, "alpha_pattern": {r"(?=q)q_proj": 4}})
    with pytest.raises(lora.LoraError, match=r"alpha_pattern key '\(\?=q\)q_proj' uses a regex feature that cannot be "
                                             "matched in linear time"):
        lora.read_adapter(path)
    with pytest.raises(lora.LoraError, match=r"target module pattern '\(q\)\\\\1' uses a regex feature"):
        lora.inject(lora.load_model(tiny_llama)[0], [r"(q)\1"])


@pytest.mark.parametrize("edit, message", [
    ({"lora_alpha": 10 ** 400}, "lora_alpha must be a finite number, got 1000"),
    ({"alpha_pattern": {"q_proj": -10 ** 400}}, r"alpha_pattern\['q_proj'\] must be a finite number, got -1000"),
    ({"lora_dropout": 10 ** 400}, "lora_dropout must be a number from 0 to 1, got 1000"),
    ({"r": 10 ** 400}, "r must be a positive integer, got 1000.* never above"),
])
def test_400_digit_numbers_are_refused_naming_the_field(good_checkpoint, tmp_path, edit, message):
    path = edited_copy(good_checkpoint, tmp_path, CONFIG, lambda c: {**c, **edit})
    with pytest.raises(lora.LoraError, match=message) as error:
        lora.read_adapter(path)
    assert f"{path}/{CONFIG}" in str(error.value) and len(str(error.value)) < 300


def test_saving_replaces_only_a_checkpoint(tiny_llama, tmp_path):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    project = tmp_path / "my_project"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "adapter_config.json").write_text("{}")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine too")
    (tmp_path / "link").symlink_to(project)
    for path in (project, notes, tmp_path / "link"):
        with pytest.raises(lora.LoraError, match=f"{path} (exists and )?is (not|a file|a symbolic link).* nothing was "
                                                 "written"):
            lora.save_adapter(model, path)
    assert sorted(os.listdir(project)) == ["adapter_config.json", "data", "notes.txt"]
    assert notes.read_text() == "mine too" and (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link", "my_project", "notes.txt"]
    # A checkpoint (ours, or PEFT's with its README.md), or an empty folder, is replaced.
    (tmp_path / "empty").mkdir()
    lora.save_adapter(model, tmp_path / "empty")
    peft = lora.save_adapter(model, tmp_path / "peft")
    (tmp_path / "peft" / "README.md").write_text("model card")
    lora.save_adapter(model, peft, training_state=STATE)
    assert sorted(os.listdir(peft)) == ["adapter_config.json", "adapter_model.safetensors", "lora_task.json",
                                        "training_state.pt"]


STATE = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, "scheduler": {"last_epoch": 3},
         "step": 3, "epoch": 0, "examples_done": 12, "best_val": math.inf, "bad_evals": 0, "settings": {"seed": 1}}


@pytest.mark.parametrize("edit, message", [
    ({"step": None}, "training_state.pt has no step"),
    ({"examples_done": None}, "training_state.pt has no examples_done"),
    ({"examples_done": -1}, "training_state.pt: examples_done must be a whole number .*, got -1"),
    ({"step": -5}, "training_state.pt: step must be a whole number .*, got -5"),
    ({"epoch": "0"}, "training_state.pt: epoch must be a whole number .*, got '0'"),
    ({"step": True}, "training_state.pt: step must be a whole number .*, got True"),
    ({"optimizer": {"state": {}}}, "training_state.pt: optimizer must be an optimizer state_dict"),
    ({"scheduler": [1]}, "training_state.pt: scheduler must be a scheduler state_dict"),
    ({"best_val": math.nan}, "training_state.pt: best_val must be a number, got nan"),
    ({"settings": "seed=1"}, "training_state.pt: settings must be an object"),
])
def test_tampered_training_state_is_one_line_naming_file_and_field(good_checkpoint, tmp_path, edit, message):
    path = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    state = {k: v for k, v in {**STATE, **edit}.items() if v is not None}
    torch.save(state, path / "training_state.pt")
    with pytest.raises(lora.LoraError, match=message) as error:
        checkpoint.load_training_state(path)
    assert "\n" not in str(error.value)
    torch.save(STATE, path / "training_state.pt")
    assert checkpoint.load_training_state(path) == STATE
