"""The engine's own forward of Llama-family models answers as Hugging Face's forward does, hooks and switches included."""
import pytest
import torch

import lora
from lora.engine import Engine, SamplingParams
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


def test_a_hook_on_a_decoder_layer_runs_in_engine_steps(tiny_llama):
    mt = lora.MultiTaskModel(tiny_llama)
    ids = mt.tokenizer("What colour is the lamp?")["input_ids"]
    plain = Engine(mt, max_num_seqs=1).generate([ids], [None], GREEDY)[0].new_token_ids
    layer = mt.pretrained_model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        hooked = Engine(mt, max_num_seqs=1).generate([ids], [None], GREEDY)[0].new_token_ids
        assert hooked == hf_answer(mt, ids, None)[0] != plain
    finally:
        handle.remove()
    assert Engine(mt, max_num_seqs=1).generate([ids], [None], GREEDY)[0].new_token_ids == plain
