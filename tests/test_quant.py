"""Quantized base models: LoRA trains over 4-bit and 8-bit layers, saves, reloads, and matches PEFT + bitsandbytes."""
import contextlib
import json
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from lora.cli import main
from lora.data import collate, load_examples
from lora.int8 import Int8Linear
from lora.quant import (
    METHODS,
    TRAIN_METHODS,
    dense_weight,
    dequantize_model,
    is_quantized,
    model_quantization,
    quantization_config,
    quantize_model,
)

from .conftest import PROMPT, finetune_argv, make_records, write_task

BNB_METHODS = ("nf4", "fp4", "int8")


def token_batch(tokenizer, n=4):
    texts = [PROMPT.format(**r) + r["output"] for r in make_records(n, seed=3)]
    return tokenizer(texts, return_tensors="pt", padding=True)


def lora_names(model):
    return {n for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n}


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits


def quantized_linears(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", TRAIN_METHODS)  # w4a16 serves only (tests/test_int4.py)
def test_lora_trains_over_a_quantized_base(tiny_llama, method):
    model, tokenizer = lora.load_model(tiny_llama, quantize=method)
    kinds = quantized_linears(model)
    assert kinds.pop("lm_head") == "Linear"  # the output head stays float, as transformers' loader leaves it
    assert set(kinds.values()) == {"Int8Linear" if method == "w8a16" else
                                   "Linear8bitLt" if method == "int8" else "Linear4bit"}
    lora.inject(model, "all-linear", r=8, alpha=16)
    model.gradient_checkpointing_enable({"use_reentrant": False})  # as lora finetune --gradient_checkpointing
    base = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    model.train()
    batch = token_batch(tokenizer)
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    losses = []
    for step in range(12):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        # Every LoRA matrix gets a gradient (A from step 1: B starts at zero), also after an eval-mode forward
        # (validation) and in the first layer, whose input comes from frozen weights only; nothing else gets one.
        expected = lora_names(model) if step else {n for n in lora_names(model) if n.endswith("lora_B")}
        assert with_grad == expected, step
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 2:
            model.eval()
            logits(model, batch)
            model.train()
    assert losses[-1] < 0.75 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in base.items())  # the base is never written


@pytest.mark.parametrize("method", METHODS)
def test_save_and_reload_on_the_same_quantized_base_gives_the_same_logits(tiny_llama, tmp_path, method):
    model, tokenizer = lora.load_model(tiny_llama, quantize=method)
    lora.inject(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", task={"quantization_config": model_quantization(model)})
    batch = token_batch(tokenizer)
    expected = logits(model, batch)

    fresh = lora.load_model(tiny_llama, quantize=method)[0]
    adapter = lora.load_adapter(fresh, tmp_path / "adapter")
    assert adapter.task["quantization_config"] == quantization_config(method)
    assert torch.equal(logits(fresh, batch), expected)
    assert not torch.allclose(logits(lora.load_model(tiny_llama, quantize=method)[0], batch), expected)


def bnb_loaded(path, method, double_quant=False):
    """The base as PEFT users load it: transformers' bitsandbytes loader, from our quantization record."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    record = {k: v for k, v in quantization_config(method, double_quant).items() if k != "quant_method"}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**record),
                                                device_map="cpu")


# Compared in train mode (under no_grad): in eval mode bitsandbytes repacks 4-bit weights for a bfloat16
# kernel on AVX512-BF16 CPUs, which our layers switch off (see lora/quant.py) and transformers' do not.
@pytest.mark.parametrize("method,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
def test_peft_round_trip_on_the_same_bitsandbytes_base(tiny_llama, tmp_path, method, double_quant):
    from peft import LoraConfig, PeftModel, get_peft_model

    ours, tokenizer = lora.load_model(tiny_llama, quantize=method, double_quant=double_quant)
    batch = token_batch(tokenizer)
    theirs = bnb_loaded(tiny_llama, method, double_quant)
    assert torch.equal(logits(ours.train(), batch), logits(theirs.train(), batch))  # the same quantized base

    # Ours -> PEFT.
    lora.inject(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(1)
    for layer in lora.lora_layers(ours).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    lora.save_adapter(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(theirs, tmp_path / "ours").train()
    expected = logits(ours.train(), batch)
    torch.testing.assert_close(logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)

    # PEFT -> ours.
    peft_model = get_peft_model(bnb_loaded(tiny_llama, method, double_quant),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lora.load_model(tiny_llama, quantize=method, double_quant=double_quant)[0]
    lora.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours.train(), batch), logits(peft_model.train(), batch), rtol=1e-5, atol=1e-5)


def test_w8a16_holds_bitsandbytes_int8_values_and_is_close_to_float(tiny_llama, tiny_tokenizer):
    w8 = lora.load_model(tiny_llama, quantize="w8a16")[0]
    int8 = lora.load_model(tiny_llama, quantize="int8")[0]
    full = lora.load_model(tiny_llama)[0]
    for name, module in w8.named_modules():
        if isinstance(module, Int8Linear):
            # The same int8 values as bitsandbytes' int8; the row scales rounded to bfloat16 for the kernel.
            assert torch.equal(module.weight, int8.get_submodule(name).weight.data)
            torch.testing.assert_close(dense_weight(module), dense_weight(int8.get_submodule(name)), rtol=2**-8, atol=0)
            float_weight = full.get_submodule(name).weight
            assert (dense_weight(module) - float_weight).abs().max() <= float_weight.abs().max() / 127
    batch = token_batch(tiny_tokenizer)
    expected = logits(full, batch)
    assert (logits(w8, batch) - expected).abs().max() < 0.05 * expected.abs().max()
    layers = [n for n, m in w8.named_modules() if isinstance(m, Int8Linear)]
    assert nbytes(w8, layers) < 0.27 * nbytes(full, layers)  # a quarter of float32, plus one scale per row


def test_w8a16_can_take_a_tied_output_head_and_the_embedding_stays_float(tiny_gpt2, tiny_tokenizer):
    model = lora.load_model(tiny_gpt2)[0]
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    batch = token_batch(tiny_tokenizer)
    expected = logits(model, batch)
    with pytest.raises(lora.LoraError, match="no Linear layer to quantize besides its output head .*Conv1D"):
        quantize_model(model, "w8a16")
    assert quantize_model(model, "w8a16", head=True) == ["lm_head"]
    assert isinstance(model.lm_head, Int8Linear) and model.transformer.wte.weight.dtype == torch.float32
    assert model_quantization(model)["modules_to_not_convert"] == []
    assert (logits(model, batch) - expected).abs().max() < 0.05 * expected.abs().max()


def nbytes(model, names):
    return sum(t.numel() * t.element_size() for n in names for t in model.get_submodule(n).state_dict().values())


@pytest.mark.parametrize("method", ["nf4", "int8", "w8a16", "w4a16"])
def test_merge_goes_through_a_dequantized_copy_and_says_so(tiny_llama, tiny_tokenizer, method, capsys):
    model = lora.load_model(tiny_llama, quantize=method)[0]
    lora.inject(model, ["q_proj", "o_proj"], r=4)
    torch.manual_seed(2)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    batch = token_batch(tiny_tokenizer)
    expected = logits(model.train(), batch)
    with pytest.raises(lora.LoraError, match=r"cannot merge .* quantized .*\(lora.quant.dequantize_model\)"):
        model.model.layers[0].self_attn.q_proj.merged()  # a packed layer alone refuses
    merged = lora.merge_and_unload(model)
    assert "merging into a de-quantized float copy of its 14 quantized layers" in capsys.readouterr().err
    assert not lora.lora_layers(merged) and model_quantization(merged) is None
    assert not any(is_quantized(m) for m in merged.modules())
    tolerance = 2e-2 if method.endswith("a16") else 1e-4  # w8a16, w4a16: bfloat16 activations, the copy float32
    torch.testing.assert_close(logits(merged, batch), expected, rtol=tolerance, atol=tolerance)


def test_dequantizing_a_bfloat16_base_gives_bfloat16_linears(tiny_llama, tiny_tokenizer):
    model = lora.load_model(tiny_llama, dtype="bfloat16", quantize="nf4", compute_dtype="bfloat16")[0]
    batch = token_batch(tiny_tokenizer)
    expected = logits(model, batch)
    dequantize_model(model)
    assert {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)} == {torch.bfloat16}
    torch.testing.assert_close(logits(model, batch), expected, rtol=0.05, atol=0.05)


def test_bad_quantization_settings_get_one_clear_error(tiny_llama):
    with pytest.raises(lora.LoraError, match="unknown quantization 'int4'; use one of nf4, fp4, int8, w8a16"):
        lora.load_model(tiny_llama, quantize="int4")
    with pytest.raises(lora.LoraError, match="--double_quant .* nf4 and fp4, not int8"):
        lora.load_model(tiny_llama, quantize="int8", double_quant=True)
    with pytest.raises(lora.LoraError, match="unknown compute dtype 'float8'"):
        lora.load_model(tiny_llama, quantize="nf4", compute_dtype="float8")
    with pytest.raises(lora.LoraError, match="output head is offered for w8a16 .*, not nf4"):
        quantize_model(lora.load_model(tiny_llama)[0], "nf4", head=True)
    model = lora.load_model(tiny_llama, quantize="nf4")[0]
    with pytest.raises(lora.LoraError, match="already quantized"):
        quantize_model(model, "int8")
    model = lora.load_model(tiny_llama)[0]
    lora.inject(model, ["q_proj"])
    with pytest.raises(lora.LoraError, match="before adding LoRA layers"):
        quantize_model(model, "nf4")


def test_missing_bitsandbytes_is_one_clear_error(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    model = lora.load_model(tiny_llama)[0]
    with pytest.raises(lora.LoraError, match=r"--quantize nf4 needs bitsandbytes: pip install 'lora-pytorch\[quant\]'"):
        quantize_model(model, "nf4")
    assert quantize_model(model, "w8a16")  # needs nothing extra


def test_compute_dtype_and_double_quant_are_recorded(tiny_llama):
    model = lora.load_model(tiny_llama, quantize="nf4", double_quant=True, compute_dtype="bf16")[0]
    record = model_quantization(model)
    assert record["bnb_4bit_compute_dtype"] == "bfloat16" and record["bnb_4bit_use_double_quant"] is True
    assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4"
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model_quantization(lora.load_model(tiny_llama)[0]) is None


# ---------------------------------------------------------------- QLoRA through `lora finetune`

def test_qlora_finetune_with_checkpointing_and_packing_trains_saves_and_reloads(tiny_llama, other_llama, tmp_path,
                                                                                capsys):
    task = write_task(tmp_path / "task")
    ckpt = tmp_path / "ckpt"
    argv = finetune_argv(tiny_llama, task, ckpt, "--quantize", "nf4", "--double_quant", "--gradient_checkpointing",
                         "--packing", "--max_seq_length", 128, "--batch_size", 2, "--num_epochs", 3,
                         "--learning_rate", 1e-2, "--lora_dropout", 0, "--validation_data_path",
                         task / "validation.json")
    assert main(["finetune", *argv]) == 0
    assert "of the base model's 44,192" in capsys.readouterr().err  # packed 4-bit weights counted as floats
    val = [r["val_loss"] for r in map(json.loads, open(ckpt / "metrics.jsonl")) if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.2
    meta = json.loads((ckpt / "final" / "lora_task.json").read_text())
    assert meta["quantization_config"] == quantization_config("nf4", double_quant=True)
    assert meta["training_args"]["quantize"] == "nf4"
    # Reloaded on a fresh base quantized the same way, it is the model training validated...
    model, tokenizer = lora.load_model(tiny_llama, quantize="nf4", double_quant=True)
    lora.load_adapter(model, ckpt / "final")
    examples = load_examples(str(task / "validation.json"), tokenizer, 128, prompt_format=PROMPT)[0]
    with torch.no_grad():
        loss = model(**collate(examples, tokenizer.pad_token_id)).loss
    assert float(loss) == pytest.approx(val[-1], rel=1e-4)
    # ... and it is refused on another model, quantized or not.
    for quantize in (None, "nf4"):
        with pytest.raises(lora.LoraError, match="weights of .* differ from those the adapter was trained on"):
            lora.load_adapter(lora.load_model(other_llama, quantize=quantize)[0], ckpt / "final")


@pytest.fixture(scope="module")
def wide_llamas(tiny_tokenizer, tmp_path_factory):
    """Two Llamas with weights of 8k+ values (bitsandbytes' CPU 4-bit quantization is far coarser below ~4k), the
    second with other weights of another scale, as two trained models have. (Two random models of one
    initialisation differ in a sample's sums by about as much as 4-bit quantization moves them.)"""
    paths = []
    for seed, scale in ((0, 0.02), (1, 0.03)):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=256,
                             initializer_range=scale)
        path = tmp_path_factory.mktemp(f"wide-llama-{seed}")
        LlamaForCausalLM(config).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def test_adapters_move_between_float_and_quantized_bases(wide_llamas, tmp_path):
    base, other = wide_llamas
    for method in (None, *METHODS):  # trained on each base, loaded on each other one
        model = lora.load_model(base, quantize=method)[0]
        lora.inject(model, "all-linear", r=4)
        lora.save_adapter(model, tmp_path / str(method), task={"quantization_config": model_quantization(model)})
    # A refused adapter changes nothing, so one model of the other base per method takes every refusal.
    others = {method: lora.load_model(other, quantize=method)[0] for method in (None, *METHODS)}
    for trained, loaded in [(a, b) for a in (None, *METHODS) for b in (None, *METHODS) if a != b]:
        lora.load_adapter(lora.load_model(base, quantize=loaded)[0], tmp_path / str(trained))
        with pytest.raises(lora.LoraError, match="differ from those the adapter was trained on"):
            lora.load_adapter(others[loaded], tmp_path / str(trained))


def test_resume_refuses_another_quantization(tiny_llama, tmp_path, capsys):
    task = write_task(tmp_path / "task")
    argv = finetune_argv(tiny_llama, task, tmp_path / "c", "--quantize", "nf4", "--max_steps", 2, "--save_steps", 1)
    assert main(["finetune", *argv]) == 0
    resume = [*argv, "--load_from_checkpoint", str(tmp_path / "c" / "step-1")]
    assert main(["finetune", *resume, "--quantize", "fp4"]) == 2
    assert "--quantize was 'nf4', now 'fp4'" in capsys.readouterr().err
    assert main(["finetune", *resume]) == 0


@pytest.mark.parametrize("flags, message", [
    (("--quantize", "int4"), "argument --quantize: invalid choice: 'int4'"),
    (("--double_quant",), "--double_quant applies to a quantized base: add --quantize nf4"),
    (("--compute_dtype", "bfloat16"), "--compute_dtype applies to a quantized base"),
    (("--quantize", "int8", "--double_quant"), "--double_quant quantizes 4-bit block scales; .* not int8"),
])
def test_bad_quantize_flags_get_one_clear_line(tiny_llama, tmp_path, capsys, flags, message):
    task = write_task(tmp_path / "task")
    with contextlib.suppress(SystemExit):  # argparse's choices exit 2 itself
        assert main(["finetune", *finetune_argv(tiny_llama, task, tmp_path / "c", *flags)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "c")
