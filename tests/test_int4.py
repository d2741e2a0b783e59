"""w4a16: int4 weights in Q4_1 groups of 32 on PyTorch's int4 CPU kernel, from float weights or a GGUF's own blocks."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from lora.cli import main
from lora.gguf_layout import layout_of, rope_reorder, rope_restore
from lora.int4 import Int4Linear
from lora.int8 import Int8Linear
from lora.quant import dense_weight, dequantize_model, model_quantization

from .conftest import finetune_argv, write_task

BF16_HALF_ULP = 2.0 ** -8  # rounding to the nearest bfloat16 (8 significant bits) moves x by at most |x| * 2^-8


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def prompt_ids(tokenizer):
    return torch.tensor([tokenizer("What colour is the apple? The river is blue")["input_ids"]])


def test_w4a16_holds_q4_1_groups_and_its_logits_are_the_dequantized_models(tiny_llama, tiny_tokenizer):
    float_model = lora.load_model(tiny_llama)[0]
    model = lora.load_model(tiny_llama, quantize="w4a16")[0]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear  # load_model keeps the head float unless asked
    for name, layer in layers.items():
        w = float_model.get_submodule(name).weight.detach()
        groups = w.reshape(w.shape[0], -1, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / 15  # Q4_1: 16 levels between each group's min and max
        error = (dense_weight(layer) - w).reshape(groups.shape).abs().amax(-1)
        # Half a step of rounding; q is rounded against the bfloat16 scale and zero, whose rounding can push the
        # group's max past q = 15 (by up to 15 scale roundings) or its min below 0 (by zero's, |zero| <= |w| + 8 step).
        bound = step / 2 + BF16_HALF_ULP * (24 * step + groups.abs().amax(-1)) + 1e-6
        assert (error <= bound).all(), name
    assert model_quantization(model) == {"quant_method": "w4a16", "bits": 4, "group_size": 32, "symmetric": False,
                                         "activation_dtype": "bfloat16", "modules_to_not_convert": ["lm_head"],
                                         "modules_in_int8": []}
    ids = prompt_ids(tiny_tokenizer)
    got, reference = logits(model, ids), logits(float_model, ids)
    dequantize_model(model)  # the way to merge and export: float Linears of the same values
    dequantized = logits(model, ids)
    # Against the float model holding the same int4 values only the bfloat16 activations differ (8 bits: ~0.4%).
    assert ((got - dequantized).norm() / dequantized.norm()) < 0.02
    # Against the original weights: 16 levels a group move each weight by up to ~1/30 of its group's range.
    assert 0 < ((got - reference).norm() / reference.norm()) < 0.2


def test_a_layer_the_kernel_cannot_take_stays_float_and_is_named_once(tiny_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = lora.load_model(tmp_path, quantize="w4a16")[0]
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["down_proj"] == "Int4Linear"  # 64 in, 48 out: the kernel's shape
    assert {kinds[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")} == {"Linear"}
    err = capsys.readouterr().err
    assert err.count("w4a16: 6 linear layer(s) stay float") == 1 and "model.layers.0.self_attn.q_proj" in err, err
    assert logits(model, prompt_ids(tiny_tokenizer)).isfinite().all()


def q4_1_gguf(model, path):
    """`model`'s linear layers as llama.cpp's converter writes them in a Q4_1 GGUF: q/k rows reordered, then blocks."""
    layout = layout_of(model.config)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            w = m.weight.detach().float()
            heads = layout.rope_heads(name)
            if heads is not None:
                w = rope_reorder(w, heads)
            writer.add_tensor(layout.tensor_name(name), gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def gguf_weights(path, model):
    """{module name: the GGUF's Q4_1 tensor de-quantized by the gguf package, in HF's row order}."""
    layout = layout_of(model.config)
    names = {layout.tensor_name(n): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        heads = layout.rope_heads(names[t.name])
        found[names[t.name]] = w if heads is None else rope_restore(w, heads)
    return found


@pytest.fixture
def packaged(tiny_llama, other_llama, tmp_path, monkeypatch):
    """The default model swapped for tiny_llama's folder, its 'packaged GGUF' holding other_llama's weights in Q4_1:
    what load_model takes from each is then visible."""
    path = q4_1_gguf(lora.load_model(other_llama)[0], tmp_path / "other.Q4_1.gguf")
    monkeypatch.setattr("lora.models.prepare_smollm2", lambda: tiny_llama)
    monkeypatch.setattr("lora.models.smollm2_gguf", lambda: path)
    return path


def test_w4a16_takes_the_default_models_q4_1_blocks_as_they_are(packaged, tiny_llama, tiny_tokenizer):
    model = lora.load_model("smollm2-135m", quantize="w4a16", quantize_head=True)[0]
    expected = gguf_weights(packaged, model)
    assert len(expected) == 14 and isinstance(model.lm_head, Int8Linear)  # a quantized head: int8 rows
    for name, w in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear), name
        groups = w.reshape(w.shape[0], -1, 32)
        d = (groups.amax(-1) - groups.amin(-1)) / 15 * (1 + 2 ** -10)  # d as float16 stored it, a little above
        # The same q; d and m rounded float16 -> bfloat16: (q - 8) * d's rounding plus zero's (|m + 8d|).
        bound = BF16_HALF_ULP * (8 * d + (groups.amin(-1) + 8 * d).abs()) + 1e-6
        error = (dense_weight(layer) - w).reshape(groups.shape).abs().amax(-1)
        assert (error <= bound).all(), name
    float_tiny = lora.load_model(tiny_llama)[0]  # the embedding and norms come from the model folder
    assert torch.equal(model.model.embed_tokens.weight, float_tiny.model.embed_tokens.weight)
    assert not torch.allclose(dense_weight(model.model.layers[0].mlp.up_proj),
                              float_tiny.model.layers[0].mlp.up_proj.weight, atol=0.01)  # not the folder's weights
    assert logits(model, prompt_ids(tiny_tokenizer)).isfinite().all()


def test_a_gguf_that_does_not_fit_the_model_is_one_clear_error(packaged, tmp_path, monkeypatch):
    model = lora.load_model("smollm2-135m")[0]
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 32, bias=False)  # transposed: 32 x 64 in the file
    path = q4_1_gguf(model, tmp_path / "bad.gguf")
    monkeypatch.setattr("lora.models.smollm2_gguf", lambda: path)
    with pytest.raises(lora.LoraError, match=r"blk\.1\.ffn_up\.weight is 32 x 64 but model\.layers\.1\.mlp\.up_proj "
                                             r"is 64 x 32; the GGUF and the model folder do not belong together"):
        lora.load_model("smollm2-135m", quantize="w4a16")


def test_w4a16_serves_only_finetune_refuses_it_in_one_line(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    task = write_task(tmp_path / "task")
    assert main(["finetune", *finetune_argv(tiny_llama, task, tmp_path / "c", "--quantize", "w4a16")]) == 2
    err = capsys.readouterr().err
    assert "--quantize w4a16 is for serving" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
    model = lora.load_model(tiny_llama, quantize="w4a16")[0]
    lora.inject(model, ["q_proj"], r=4)
    batch = prompt_ids(tiny_tokenizer)
    with pytest.raises(lora.LoraError, match="w4a16 layers have no backward"):
        model(batch, labels=batch).loss.backward()


def test_generate_takes_quantize_w4a16(tiny_llama, capsys):
    assert main(["generate", "--model", tiny_llama, "--instruction", "What colour is the apple?", "--max_new_tokens",
                 "5", "--device", "cpu", "--quantize", "w4a16"]) == 0
    expected = lora.MultiTaskModel(tiny_llama, device="cpu", quantize="w4a16").generate_response(
        None, "What colour is the apple?", max_new_tokens=5)
    assert capsys.readouterr().out == expected + "\n"
