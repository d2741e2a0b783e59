"""LoRA math and injection: what a user of loralib or PEFT expects from `lora.inject`."""
import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import lora
from lora.layers import LoraLayer, lora_update


def load(path):
    return lora.load_model(path)[0]


def test_fresh_adapter_changes_nothing_and_only_lora_trains(tiny_llama):
    model = load(tiny_llama)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    names = lora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert torch.equal(model(ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_base_weights_are_shared_not_copied(tiny_llama):
    model = load(tiny_llama)
    weight = model.model.layers[0].self_attn.q_proj.weight
    lora.inject(model, ["q_proj"])
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight is weight


@pytest.mark.parametrize("module, x", [
    (nn.Linear(6, 5), torch.randn(3, 6)),
    (Conv1D(5, 6), torch.randn(3, 6)),
    (nn.Embedding(10, 5), torch.tensor([1, 4, 9])),
])
def test_forward_equals_merged_weight(module, x):
    layer = LoraLayer(module, r=2, alpha=4, rslora=False)
    nn.init.normal_(layer.lora_B)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, module(x))
    merged = layer.merged()
    assert torch.allclose(merged(x), unmerged, atol=1e-5)


def test_rslora_scaling():
    assert LoraLayer(nn.Linear(4, 4), r=16, alpha=8, rslora=True).scaling == pytest.approx(2.0)
    assert LoraLayer(nn.Linear(4, 4), r=16, alpha=8).scaling == pytest.approx(0.5)


@pytest.mark.parametrize("targets, expected", [
    ("all-linear", 14),  # 7 linear layers x 2 blocks; lm_head excluded
    ([r"model\.layers\.1\..*_proj"], 7),
    (["model.layers.0.self_attn.q_proj"], 1),
    (["q_proj", "k_proj"], 4),
])
def test_target_module_forms(tiny_llama, targets, expected):
    model = load(tiny_llama)
    names = lora.inject(model, targets)
    assert len(names) == expected and "lm_head" not in names


def test_gpt2_conv1d_and_embedding(tiny_gpt2):
    model = load(tiny_gpt2)
    names = lora.inject(model, ["c_attn", "wte"])
    assert "transformer.wte" in names and len(names) == 3


def test_inject_on_meta_device_counts_parameters(tiny_llama):
    config = AutoConfig.from_pretrained(tiny_llama)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora.inject(model, "all-linear", r=4)
    n = sum(p.numel() for p in lora.lora_parameters(model))
    assert n == 2 * (4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 64) * 3)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("targets, r, message", [
    (["nope_proj"], 8, "match nothing"),
    (["mlp"], 8, "LoRA wraps only Linear"),
    (["q_proj"], 0, "positive integer"),
    (["q_proj["], 8, "not a valid regex"),
])
def test_inject_errors_name_the_problem(tiny_llama, targets, r, message):
    with pytest.raises(lora.LoraError, match=message):
        lora.inject(load(tiny_llama), targets, r=r)


def test_merge_and_unload_gives_plain_model_with_same_output(tiny_llama):
    model = load(tiny_llama)
    lora.inject(model, "all-linear", r=4)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    expected = model(ids).logits
    lora.merge_and_unload(model)
    assert not lora.lora_layers(model)
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 48), (5, 48), (1, 1, 48)])
def test_low_precision_base_trains_as_autograd_would_without_float_copies(dtype, shape):
    """A bfloat16 base under a float32 adapter: the output and gradients equal plain autograd over
    lora_update bit for bit, and backward keeps x as it came, not a float32 copy of it per layer."""
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(48, 80).to(dtype), r=8, alpha=16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(shape).to(dtype).requires_grad_()
    grad = torch.randn(*shape[:-1], 80).to(dtype)
    expected = layer.base_layer(x) + lora_update(x, layer.lora_A, layer.lora_B, layer.scaling).to(dtype)
    expected_grads = torch.autograd.grad(expected, (x, layer.lora_A, layer.lora_B), grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), grad)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
