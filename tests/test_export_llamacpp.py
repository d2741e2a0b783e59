"""Opt-in, slow: llama.cpp with an exported adapter decodes the same greedy tokens as this engine on merged weights.

    .venv/bin/python -m pytest -m slow tests/test_export_llamacpp.py     # needs llama-cpp-python (bench/README.md)
"""
import importlib.util
import os

import pytest

import lora
from bench.export import agreement, engine_tokens, f32_base, llama_cpp_tokens
from bench.make_adapters import make_adapters
from lora.data import load_records

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
