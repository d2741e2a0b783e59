"""The engine's own forward of Llama-family models answers as Hugging Face's forward does, hooks and switches included."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from lora.engine import Engine, SamplingParams
from lora.int4 import Int4Linear, fuse_int4
from lora.int8 import Int8Linear, fuse_int8
from tests.conftest import make_adapter

GREEDY = SamplingParams(max_tokens=12, min_tokens=12, logprobs=0)  # a fixed length: no early eos on random models


def answer(output):
    """An engine answer: its tokens and their log-probabilities."""
    return output.new_token_ids, [t.logprob for t in output.logprobs]


def hf_answer(mt, ids, task):
    """Hugging Face's own greedy decoding of the model with `task` applied (merged weights; None: the base)."""
    with mt.apply_downstream(task) as model:
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=mt.tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, pytest.approx(logprobs, abs=1e-4)  # the same to float32 rounding


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_engine_answers_equal_hugging_face_generate_across_task_switches(request, fixture, tmp_path):
    base = request.getfixturevalue(fixture)
    mt = lora.MultiTaskModel(base, {name: make_adapter(base, tmp_path / name, "all-linear", seed)
                                    for seed, name in enumerate(["qa", "sum"])})
    ids = [mt.tokenizer(f"What colour is the {thing}?")["input_ids"] for thing in ("lamp", "river")]
    engine = Engine(mt, max_num_seqs=2)
    for task in [None, "qa", "sum", None, "qa"]:  # one engine: each task's merged weights switched in and out
        assert [answer(o) for o in engine.generate(ids, [task] * 2, GREEDY)] == [hf_answer(mt, i, task) for i in ids]
    mixed = engine.generate(ids, ["qa", "sum"], GREEDY)  # one step, two tasks: each token its own task's update
    assert [answer(o) for o in mixed] == [hf_answer(mt, ids[0], "qa"), hf_answer(mt, ids[1], "sum")]
    stats = engine.stats()  # a llama's every step ran lean (a silent fallback would only cost speed); gpt2's none
    lean = stats["steps_total"] if fixture == "tiny_llama" else 0
    assert stats["steps_total"] > 0 and stats["lean_steps_total"] == lean


def test_a_hook_on_a_decoder_layer_runs_in_engine_steps(tiny_llama):
    mt = lora.MultiTaskModel(tiny_llama)
    ids = mt.tokenizer("What colour is the lamp?")["input_ids"]
    plain = Engine(mt, max_num_seqs=1).generate([ids], [None], GREEDY)[0].new_token_ids
    layer = mt.pretrained_model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        engine = Engine(mt, max_num_seqs=1)
        hooked = engine.generate([ids], [None], GREEDY)[0].new_token_ids
        assert hooked == hf_answer(mt, ids, None)[0] != plain
        assert engine.stats()["lean_steps_total"] == 0  # the model's own forward ran, with the hook
    finally:
        handle.remove()
    assert Engine(mt, max_num_seqs=1).generate([ids], [None], GREEDY)[0].new_token_ids == plain


def own_forward(run):
    """run() with the engine on the model's own forward: a global forward hook (here a no-op) turns its lean one off."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        return run()
    finally:
        handle.remove()


# w8a16: an MLP width that is no multiple of 32 (silu's vector loop leaves a tail in each row); w4a16: widths in the
# int4 kernel's packed blocks of 64 rows, so that q/k/v and gate/up fuse
@pytest.mark.parametrize("method, layer, replaced_name, hidden, kv_heads, mlp", [
    ("w8a16", Int8Linear, "down_proj", 32, 2, 112), ("w4a16", Int4Linear, "up_proj", 64, 4, 128)])
def test_quantized_engine_steps_give_the_models_own_logits_bit_for_bit_hooks_and_replaced_layers_included(
        tiny_tokenizer, method, layer, replaced_name, hidden, kv_heads, mlp):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=len(tiny_tokenizer), initializer_range=0.1)
    mt = lora.MultiTaskModel(LlamaForCausalLM(config).eval(), tokenizer=tiny_tokenizer, quantize=method)
    prompts = [mt.tokenizer(f"What colour is the {thing}?")["input_ids"] for thing in ("lamp", "river", "sky")]
    engine = Engine(mt, max_num_seqs=3, max_prefill_tokens=5)  # q/k/v and gate/up each run as one quantized matmul

    def answers():  # three sequences, prompts in chunks: steps of several rows and of one
        return [answer(o) for o in engine.generate(prompts, [None] * 3, GREEDY)]
    lean = answers()
    assert lean == own_forward(answers)  # the log-probabilities too, to the last bit
    layers = mt.pretrained_model.model.layers
    handle = layers[0].self_attn.k_proj.register_forward_hook(lambda module, args, out: out * 2)
    try:
        hooked = answers()
        assert hooked == own_forward(answers) and hooked != lean
    finally:
        handle.remove()
    assert answers() == lean
    old = getattr(layers[1].mlp, replaced_name)
    setattr(layers[1].mlp, replaced_name, layer.from_linear(torch.nn.Linear(old.in_features, old.out_features, bias=False)))
    replaced = answers()
    assert replaced == own_forward(answers) and replaced != lean


@pytest.mark.parametrize("layer, fuse, rows", [(Int8Linear, fuse_int8, (64, 32, 32)), (Int4Linear, fuse_int4, (64, 64, 32))])
def test_quantized_layers_of_one_input_fuse_into_one_bit_for_bit_without_a_second_weight(layer, fuse, rows):
    torch.manual_seed(0)
    layers = [layer.from_linear(torch.nn.Linear(64, n, bias=False)) for n in rows]
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = torch.cat([m(x) for m in layers], -1)
        fused = fuse(layers)
        assert fused is not None and torch.equal(fused(x), expected)
        assert {m.weight.untyped_storage().data_ptr() for m in [fused, *layers]} == {
            fused.weight.untyped_storage().data_ptr()}  # the layers' weights are rows of the fused one
        assert torch.equal(torch.cat([m(x) for m in layers], -1), expected)
    assert fuse([layers[0], layer.from_linear(torch.nn.Linear(64, 16))]) is None  # a bias: not fused
    other = Int4Linear if layer is Int8Linear else Int8Linear
    assert fuse([layers[0], other.from_linear(torch.nn.Linear(64, 16, bias=False))]) is None


def test_int8_layers_the_kernel_cannot_take_are_not_fused_and_run_de_quantized():
    odd = Int8Linear.from_linear(torch.nn.Linear(40, 8, bias=False))  # the kernel would crash on 40 input features
    assert fuse_int8([odd]) is None
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(odd(x), x @ odd.dense_weight().T, rtol=0.02, atol=0.02)


def test_int4_layers_whose_rows_the_kernel_packs_across_are_not_fused():
    layers = [Int4Linear.from_linear(torch.nn.Linear(64, n, bias=False)) for n in (32, 64)]
    assert fuse_int4(layers) is None  # 32 rows, then more: the kernel packs blocks of 64 rows across them
