"""The PEFT on-disk format both ways, atomic writes, and checkpoints that must be refused."""
import json
import os

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lora

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
    assert os.path.getsize(tmp_path / "a" / "adapter_model.safetensors") < 0.05 * base_bytes  # tiny model: r/hidden is large


def test_save_is_atomic_when_interrupted(tiny_llama, tmp_path, monkeypatch):
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    lora.save_adapter(model, tmp_path / "ckpt")
    before = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    randomized(model)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("lora.checkpoint.write_json", killed)
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


def test_fingerprint_matches_across_dtypes(tiny_llama, tmp_path):
    path = saved(tiny_llama, tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        model = lora.load_model(tiny_llama, dtype=dtype)[0]
        lora.load_adapter(model, path)  # same base in another dtype: accepted
