"""Serving over a quantized base: tasks apply as per-token updates, the base is never written, and every answer of a
mixed batch equals the request alone on the same quantized model."""
import json

import pytest
import torch
import torch.nn as nn

import lora
from lora.cli import main
from lora.engine import Engine, SamplingParams
from lora.quant import model_quantization

from .conftest import PROMPT, THINGS

GREEDY = SamplingParams(max_tokens=10, min_tokens=10)  # a fixed length: no early eos on random models
TARGETS = {"qa": ["q_proj", "v_proj"], "sum": "all-linear", "emb": ["embed_tokens", "o_proj"]}


def quantized_adapters(base, root, method):
    """Random (seeded) adapters trained, as QLoRA trains them, on `base` quantized with `method`."""
    mapper = {}
    for seed, (name, targets) in enumerate(TARGETS.items()):
        model = lora.load_model(base, quantize=method)[0]
        lora.inject(model, targets, r=4, alpha=8)
        torch.manual_seed(seed)
        for layer in lora.lora_layers(model).values():
            nn.init.normal_(layer.lora_B, std=0.3)
        mapper[name] = lora.save_adapter(model, root / name, task={
            "prompt_format": PROMPT, "quantization_config": model_quantization(model)})
    return mapper


@pytest.fixture(scope="module", params=["nf4", "w8a16"])
def quantized(request, tiny_llama, tmp_path_factory):
    method = request.param
    mapper = quantized_adapters(tiny_llama, tmp_path_factory.mktemp(f"adapters-{method}"), method)
    return method, mapper, lora.MultiTaskModel(tiny_llama, mapper, quantize=method)


def prompt(mt, i):
    return mt.tokenizer(f"What colour is the {THINGS[i % len(THINGS)]} {THINGS[(i + 3) % len(THINGS)]}")["input_ids"]


def alone(mt, ids, task):
    return Engine(mt, max_num_seqs=1).generate([ids], [task], GREEDY)[0].new_token_ids


def packed_weights(model):
    return {n: t.clone() for n, t in model.state_dict().items() if not t.is_floating_point()}


def test_mixed_batches_over_a_quantized_base_answer_as_each_request_alone(quantized):
    method, _, mt = quantized
    assert not mt.merges
    before = packed_weights(mt.pretrained_model)
    assert before  # the base really is packed
    tasks = ["qa", None, "sum", "emb", {"qa": 0.5, "sum": 0.5}, "qa", "sum", None]
    prompts = [prompt(mt, i) for i in range(len(tasks))]
    outputs = Engine(mt, max_num_seqs=4, max_prefill_tokens=6, merge_after=2).generate(prompts, tasks,
                                                                                       [GREEDY] * len(tasks))
    for i, (ids, task) in enumerate(zip(prompts, tasks)):
        assert outputs[i].new_token_ids == alone(mt, ids, task), f"request {i} ({task}) over {method}"
    answers = {str(t): tuple(alone(mt, prompts[0], t)) for t in ("qa", "sum", "emb", None)}
    assert len(set(answers.values())) == 4  # the adapters matter
    after = packed_weights(mt.pretrained_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_task_applied_over_a_quantized_base_is_its_lora_model_and_leaves_no_trace(quantized, tiny_llama):
    method, mapper, mt = quantized
    ids = torch.tensor([prompt(mt, 1)])
    with torch.no_grad():
        base = mt.pretrained_model(ids).logits
        for task in ("qa", "emb"):
            with mt.apply_downstream(task) as model:
                assert mt.active == ((task, 1.0),)
                got = model(ids).logits
            reference = lora.load_model(tiny_llama, quantize=method)[0]
            lora.load_adapter(reference, mapper[task])  # LoRA layers over the same quantized base
            torch.testing.assert_close(got, reference(ids).logits, rtol=1e-4, atol=1e-4)
            assert not torch.equal(got, base)
            assert mt.active is None and torch.equal(mt.pretrained_model(ids).logits, base)
        mt.activate({"qa": 1.0, "sum": 0.0})  # a blend; a zero weight adds nothing
        with mt.apply_downstream("qa") as model:
            single = model(ids).logits
        torch.testing.assert_close(mt.pretrained_model(ids).logits, single, rtol=1e-5, atol=1e-5)
        mt.activate(None)
        assert torch.equal(mt.pretrained_model(ids).logits, base)


def test_generate_and_serve_take_quantize_and_int8_means_w8a16(tiny_llama, tmp_path, capsys):
    mapper = quantized_adapters(tiny_llama, tmp_path, "w8a16")
    (tmp_path / "mapper.json").write_text(json.dumps({k: str(v) for k, v in mapper.items()}))
    assert main(["generate", "--model", tiny_llama, "--mapper", str(tmp_path / "mapper.json"), "--task", "qa",
                 "--instruction", "What colour is the apple?", "--max_new_tokens", "5", "--device", "cpu",
                 "--quantize", "int8"]) == 0
    expected = lora.MultiTaskModel(tiny_llama, mapper, device="cpu", quantize="w8a16").generate_response(
        "qa", "What colour is the apple?", max_new_tokens=5)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit):
        main(["serve", "--model", tiny_llama, "--quantize", "int4"])
    assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err
