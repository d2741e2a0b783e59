"""Opt-in, slow: llama.cpp with an exported adapter decodes the same greedy tokens as this engine on merged weights.

    .venv/bin/python -m pytest -m slow tests/test_export_llamacpp.py     # needs llama-cpp-python (bench/README.md)
"""
import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch

import lora
from bench.export import agreement, engine_tokens, f32_base, llama_cpp_tokens
from bench.make_adapters import make_adapters
from lora.data import load_records
from lora.gguf_layout import rope_restore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 24


def test_llama_cpp_with_the_exported_adapter_decodes_the_engines_tokens(tmp_path):
    path = make_adapters(str(tmp_path / "adapters"), tasks=1, r=8, alpha=16, std=0.02)["task0"]
    base = f32_base(str(tmp_path / "base-f32.gguf"))
    mt = lora.MultiTaskModel("smollm2-135m", {"task0": path}, device="cpu", dtype="float32")
    adapter = lora.export_gguf_adapter(mt.pretrained_model, path, tmp_path / "task0.gguf")
    prompts = []
    for task in ("question_answering", "summarization", "extraction"):
        record = load_records(os.path.join(ROOT, "examples", task, "test.json"))[0]
        prompts.append(mt.prompt_ids({"downstream": "task0", "instruction": record["instruction"], "input": record["input"]}))
    ours, _ = engine_tokens(mt, "task0", prompts, TOKENS)
    theirs, _ = llama_cpp_tokens(base, adapter, prompts, TOKENS, threads=2)
    assert [agreement(a, b) for a, b in zip(ours, theirs)] == [TOKENS] * len(prompts)
    base_only, _ = llama_cpp_tokens(base, None, prompts, TOKENS, threads=2)
    assert base_only != theirs  # the adapter changes llama.cpp's answers: it was applied
    merged = lora.export_gguf_merged(path, tmp_path / "merged.gguf", base_gguf=base, outtype="f32")
    folded, _ = llama_cpp_tokens(merged, None, prompts, TOKENS, threads=2)
    assert [agreement(a, b) for a, b in zip(ours, folded)] == [TOKENS] * len(prompts)


def test_without_the_qk_reordering_llama_cpp_decodes_other_tokens(tmp_path):
    """The control: a q/k adapter's updates on HF's row order land on the wrong rotary coordinates in llama.cpp."""
    path = make_adapters(str(tmp_path / "adapters"), tasks=1, r=8, alpha=16, target_modules=["q_proj", "k_proj"],
                         std=0.05)["task0"]
    base = f32_base(str(tmp_path / "base-f32.gguf"))
    mt = lora.MultiTaskModel("smollm2-135m", {"task0": path}, device="cpu", dtype="float32")
    adapter = lora.export_gguf_adapter(mt.pretrained_model, path, tmp_path / "task0.gguf")
    prompts = [mt.prompt_ids({"downstream": "task0", "instruction": r["instruction"], "input": r["input"]})
               for r in load_records(os.path.join(ROOT, "examples", "extraction", "test.json"))[:2]]
    ours, _ = engine_tokens(mt, "task0", prompts, TOKENS)
    theirs, _ = llama_cpp_tokens(base, adapter, prompts, TOKENS, threads=2)
    assert [agreement(a, b) for a, b in zip(ours, theirs)] == [TOKENS] * len(prompts)
    unordered, _ = llama_cpp_tokens(base, without_qk_reordering(adapter, tmp_path / "plain.gguf"), prompts, TOKENS, 2)
    assert unordered != ours


def without_qk_reordering(path, out):
    """A copy of an exported adapter whose q/k B rows are back in HF's order (what a converter without it writes)."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(reader.get_field("adapter.lora.alpha").contents()))
    for t in reader.tensors:
        data = np.array(t.data)
        for part, heads in ((".attn_q.weight.lora_b", 9), (".attn_k.weight.lora_b", 3)):  # SmolLM2-135M's heads
            if t.name.endswith(part):
                data = rope_restore(torch.from_numpy(data), heads).numpy()
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out)
