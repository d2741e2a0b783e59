"""A quantized base is quantized as its safetensors are read: the same model as loading it whole and quantizing."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lora
from lora.quant import model_quantization, quantize_model

from .conftest import PROMPT, make_records


def old_way(path, method, dtype=torch.float32, head=False, **kwargs):
    """What load_model did before: transformers loads the whole float model, then quantize_model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    quantize_model(model, method, head=head, **kwargs)
    return model.eval()


def assert_same_model(new, old, tokenizer):
    new_state, old_state = new.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    for key, value in old_state.items():  # the same quantized bytes, the same float weights
        assert new_state[key].dtype == value.dtype and torch.equal(new_state[key], value), key
    assert type(new.lm_head) is type(old.lm_head)
    batch = tokenizer([PROMPT.format(**r) + r["output"] for r in make_records(3, seed=5)], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        assert torch.equal(new(**batch).logits, old(**batch).logits)
    assert model_quantization(new) == model_quantization(old)
    old_config = old.config.to_dict() | {"_name_or_path": new.config._name_or_path}
    assert new.config.to_dict() == old_config and new.generation_config == old.generation_config


@pytest.mark.parametrize("method,kwargs", [("nf4", {}), ("fp4", {"double_quant": True}), ("int8", {}),
                                           ("w8a16", {}), ("w8a16", {"head": True}),
                                           ("nf4", {"compute_dtype": "bfloat16"})])
def test_a_base_quantized_as_it_is_read_equals_the_whole_model_quantized(tiny_llama, tiny_tokenizer, method, kwargs,
                                                                         capsys):
    head = kwargs.pop("head", False)
    new = lora.load_model(tiny_llama, quantize=method, quantize_head=head, **kwargs)[0]
    assert capsys.readouterr().err == ""  # read tensor by tensor: no word of loading it whole
    assert_same_model(new, old_way(tiny_llama, method, head=head, **kwargs), tiny_tokenizer)


def test_a_bfloat16_checkpoint_in_shards_loads_as_float32_or_bfloat16(tiny_llama, tiny_tokenizer, tmp_path):
    """The 1B bench's case (weights stored in bfloat16, trained over in float32), spread over index + shards."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    for dtype in (torch.float32, torch.bfloat16):
        new = lora.load_model(tmp_path, dtype=dtype, quantize="nf4")[0]
        assert new.model.embed_tokens.weight.dtype == dtype and new.lm_head.weight.dtype == dtype
        assert_same_model(new, old_way(tmp_path, "nf4", dtype=dtype), tiny_tokenizer)


def test_a_tied_head_quantized_as_it_is_read(tiny_gpt2, tiny_tokenizer):
    new = lora.load_model(tiny_gpt2, quantize="w8a16", quantize_head=True)[0]
    assert new.transformer.wte.weight.dtype == torch.float32 and not new.config.tie_word_embeddings
    assert_same_model(new, old_way(tiny_gpt2, "w8a16", head=True), tiny_tokenizer)
    with pytest.raises(lora.LoraError, match="no Linear layer to quantize besides its output head"):
        lora.load_model(tiny_gpt2, quantize="w8a16")


def test_pickled_or_broken_weights_are_refused_with_one_line(tiny_llama, tiny_tokenizer, tmp_path):
    pickled = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny_llama).config.save_pretrained(pickled)
    tiny_tokenizer.save_pretrained(pickled)
    torch.save(load_file(f"{tiny_llama}/model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(lora.LoraError, match=r"has no model.safetensors .*\(it has pytorch_model.bin: pickle, .*"
                                             r"--quantize reads safetensors only: convert the model once") as error:
        lora.load_model(pickled, quantize="nf4")
    assert "\n" not in str(error.value)

    broken = tmp_path / "broken"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(broken)
    tiny_tokenizer.save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(lora.LoraError, match=r"cannot read .*model.safetensors as safetensors .*save the model again"):
        lora.load_model(broken, quantize="w8a16")


def test_a_checkpoint_transformers_must_rename_is_loaded_whole_and_says_so(tiny_llama, tiny_tokenizer, tmp_path,
                                                                          capsys):
    """Names saved from the bare LlamaModel (no `model.` prefix): transformers maps them; so does the fallback."""
    state = {key.removeprefix("model."): value for key, value in load_file(f"{tiny_llama}/model.safetensors").items()}
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    new = lora.load_model(tmp_path, quantize="nf4")[0]
    assert ("its tensor names are not the model's own (transformers renames them on load), so it is loaded whole "
            "in float and then quantized") in capsys.readouterr().err
    assert_same_model(new, old_way(tiny_llama, "nf4"), tiny_tokenizer)
