"""The compiled decode step (torch.compile): compiled in the background, then taken, and equal to eager (float32)."""
import time

import pytest
import torch

import lora
from lora.engine import Engine, SamplingParams
from tests.conftest import save_tiny_model
from tests.test_engine import engine_tasks, prompt
from tests.test_quant_serve import quantized_adapters

GREEDY = SamplingParams(max_tokens=10, min_tokens=10)


@pytest.fixture(scope="module")
def mt(tiny_tokenizer, tmp_path_factory):
    """test_engine's tasks over a 1-layer llama: tracing takes seconds per layer, and one layer has every kind of
    module the tasks change (the steps, slots and hooks under test do not depend on the depth)."""
    base = save_tiny_model("llama", tmp_path_factory.mktemp("one-layer-llama"), tiny_tokenizer, layers=1)
    return engine_tasks(base, tmp_path_factory.mktemp("one-layer-adapters"))


def answers_as_eager(mt, backend):
    """Plain, merged and mixed requests through a compiling engine answer as through an eager one."""
    torch._dynamo.reset()  # other tests compiled other models in this process (finetune --compile): start clean
    compiled = Engine(mt, max_num_seqs=3, enforce_eager=False, compile_backend=backend)
    eager = Engine(mt, max_num_seqs=3)
    cases = [([prompt(mt, 0)], [None]), ([prompt(mt, 1, 3)], ["qa"]), ([prompt(mt, 2), prompt(mt, 3, 2)], ["sum"] * 2),
             ([prompt(mt, 4), prompt(mt, 5), prompt(mt, 6, 2)], ["emb", "qa", None])]  # the last one mixed: eager
    before = [eager.generate(p, t, GREEDY) for p, t in cases]  # meanwhile the other engine compiles
    while compiled.stats()["compiled_decode"] == "compiling":  # pytest's --timeout bounds this
        eager.generate(*cases[-1], GREEDY)  # mixed steps on the shared model attach hooks: no trace may see them
    assert compiled.stats()["compiled_decode"] == "ready", "compiling failed (the captured log says why)"
    assert eager.stats()["compiled_decode"] == "off" and eager.stats()["compiled_steps_total"] == 0
    for (prompts, tasks), expected in zip(cases, before):
        steps = compiled.stats()["compiled_steps_total"]
        answers = compiled.generate(prompts, tasks, GREEDY)
        assert [a.new_token_ids for a in answers] == [e.new_token_ids for e in expected]
        if len(set(tasks)) == 1:  # every decode step compiled
            assert compiled.stats()["compiled_steps_total"] >= steps + GREEDY.max_tokens - 1


@pytest.mark.long
def test_captured_decode_steps_answer_as_the_eager_engine(mt):
    answers_as_eager(mt, "eager")  # torch.compile's graph capture, without inductor's minutes of code generation


@pytest.mark.slow  # inductor compiles for minutes on a 2-core CPU: pytest -m slow
def test_inductor_compiled_decode_steps_answer_as_the_eager_engine(mt):
    answers_as_eager(mt, "inductor")


@pytest.mark.slow  # tracing its seven kinds of decode step takes ~10 s: pytest -m slow
def test_a_quantized_base_decodes_compiled_and_as_eager(tiny_llama, tiny_tokenizer, tmp_path):
    """Base steps run compiled; a task's steps (per-token hooks, or a blend's hooks) stay eager: compiled code
    would silently leave out hooks added after it was traced."""
    torch._dynamo.reset()
    quantized = lora.MultiTaskModel(tiny_llama, quantized_adapters(tiny_llama, tmp_path, "w8a16"), quantize="w8a16")
    compiled = Engine(quantized, max_num_seqs=2, enforce_eager=False, compile_backend="eager")
    ids = tiny_tokenizer("What colour is the apple?")["input_ids"]
    tasks = [None, "qa", {"qa": 0.5, "sum": 0.5}]
    expected = [Engine(quantized, max_num_seqs=2).generate([ids], [t], GREEDY)[0].new_token_ids for t in tasks]
    assert len({tuple(e) for e in expected}) == 3  # the tasks change the answer
    while compiled.stats()["compiled_decode"] == "compiling":  # pytest's --timeout bounds this
        time.sleep(0.1)
    assert compiled.stats()["compiled_decode"] == "ready", "compiling failed (the captured log says why)"
    for task, answer in zip(tasks, expected):
        steps = compiled.stats()["compiled_steps_total"]
        assert compiled.generate([ids], [task], GREEDY)[0].new_token_ids == answer, task
        compiled_now = compiled.stats()["compiled_steps_total"] - steps
        assert (compiled_now >= GREEDY.max_tokens - 1) == (task is None)  # base: compiled
