"""Serving over a quantized base: tasks apply as per-token updates, the base is never written, and every answer of a
mixed batch equals the request alone on the same quantized model."""
import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lora
from lora.cli import main
from lora.engine import Engine, SamplingParams
from lora.int4 import Int4Linear
from lora.int8 import Int8Linear
from lora.quant import dequantize_model, model_quantization

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


@pytest.fixture(scope="module", params=["nf4", "w8a16", "w4a16"])
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
    assert isinstance(mt.pretrained_model.lm_head, Int8Linear) == (method != "nf4")  # w8a16, w4a16: the head in int8
    assert isinstance(mt.pretrained_model.model.layers[0].mlp.up_proj, Int4Linear) == (method == "w4a16")
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
            reference = lora.load_model(tiny_llama, quantize=method, quantize_head=method != "nf4")[0]
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
    for flags, message in ((["--quantize-head"], "the output head needs a quantized base: add --quantize int8"),
                           (["--quantize", "nf4", "--quantize-head"], "output head is offered for w8a16")):
        assert main(["generate", "--model", tiny_llama, "--instruction", "Hi", "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def tied_llama(tokenizer):
    """A tiny Llama whose output head is its input embedding, as SmolLM2's is."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         vocab_size=len(tokenizer), initializer_range=0.1, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def test_w8a16_serving_quantizes_a_tied_output_head_unties_it_and_keeps_logits_close(tiny_tokenizer, tmp_path):
    ids = torch.tensor([tiny_tokenizer("What colour is the apple?")["input_ids"]])
    model = tied_llama(tiny_tokenizer)
    with torch.no_grad():
        float_head = lora.MultiTaskModel(model, tokenizer=tiny_tokenizer, quantize="w8a16", quantize_head=False)
        assert type(float_head.pretrained_model.lm_head) is nn.Linear
        reference = float_head.pretrained_model(ids).logits
        mt = lora.MultiTaskModel(tied_llama(tiny_tokenizer), tokenizer=tiny_tokenizer, quantize="w8a16")
        head, embedding = mt.pretrained_model.lm_head, mt.pretrained_model.model.embed_tokens
        assert isinstance(head, Int8Linear) and head.weight.dtype == torch.int8
        assert embedding.weight.dtype == torch.float32  # the embedding lookup stays float: only the head is int8
        assert not mt.pretrained_model.config.tie_word_embeddings
        torch.testing.assert_close(embedding.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
        logits = mt.pretrained_model(ids).logits
    assert not torch.equal(logits, reference)
    assert ((logits - reference).norm() / reference.norm()) < 0.02  # per-row int8 rounding of the head only
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    dequantize_model(mt.pretrained_model)  # the way to export: saved, the head keeps its de-quantized values
    mt.pretrained_model.save_pretrained(tmp_path)
    with torch.no_grad():
        saved = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
        torch.testing.assert_close(saved, mt.pretrained_model(ids).logits, rtol=0, atol=0)
