"""The compiled decode step (torch.compile): compiled in the background, then taken, and equal to eager (float32);
decode steps with tasks' per-token updates run a graph that holds the update, for any mix of tasks."""
import time

import pytest
import torch

import lora
from lora.engine import Engine, SamplingParams
from tests.conftest import make_adapter, save_tiny_model
from tests.test_engine import engine_tasks, prompt
from tests.test_quant_serve import quantized_adapters

GREEDY = SamplingParams(max_tokens=10, min_tokens=10)


@pytest.fixture(scope="module")
def one_layer_llama(tiny_tokenizer, tmp_path_factory):
    """A 1-layer llama: tracing takes seconds per layer, and one layer has every kind of module the tasks change
    (the steps, slots and hooks under test do not depend on the depth)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("one-layer-llama"), tiny_tokenizer, layers=1)


@pytest.fixture(scope="module")
def mt(one_layer_llama, tmp_path_factory):
    """test_engine's tasks over the 1-layer llama."""
    return engine_tasks(one_layer_llama, tmp_path_factory.mktemp("one-layer-adapters"))


def compiled_when_done(engine, state="ready"):
    """Wait out the background compile under way (pytest's --timeout bounds this)."""
    while engine.stats()["compiled_decode"] == "compiling":
        time.sleep(0.1)
    assert engine.stats()["compiled_decode"] == state, "compiling failed (the captured log says why)"


def answer_as_before(engine, cases, expected):
    """Each case answers as `expected`, every decode step of it running compiled code."""
    for (prompts, tasks), before in zip(cases, expected):
        steps = engine.stats()["compiled_steps_total"]
        answers = engine.generate(prompts, tasks, GREEDY)
        assert [a.new_token_ids for a in answers] == [e.new_token_ids for e in before], tasks
        assert engine.stats()["compiled_steps_total"] >= steps + GREEDY.max_tokens - 1, tasks


def answers_as_eager(mt, backend):
    """Plain, merged and mixed requests through a compiling engine answer as through an eager one."""
    torch._dynamo.reset()  # other tests compiled other models in this process (finetune --compile): start clean
    compiled = Engine(mt, max_num_seqs=3, enforce_eager=False, compile_backend=backend)
    eager = Engine(mt, max_num_seqs=3)
    cases = [([prompt(mt, 0)], [None]), ([prompt(mt, 1, 3)], ["qa"]), ([prompt(mt, 2), prompt(mt, 3, 2)], ["sum"] * 2),
             ([prompt(mt, 4), prompt(mt, 5), prompt(mt, 6, 2)], ["emb", "qa", None])]  # the last one mixed
    before = [eager.generate(p, t, GREEDY) for p, t in cases]  # meanwhile the other engine compiles
    while compiled.stats()["compiled_decode"] == "compiling":  # pytest's --timeout bounds this
        eager.generate(*cases[-1], GREEDY)  # mixed steps on the shared model attach hooks: no trace may see them
    compiled_when_done(compiled)
    assert eager.stats()["compiled_decode"] == "off" and eager.stats()["compiled_steps_total"] == 0
    compiled.generate(*cases[-1], GREEDY)  # its first mixed decode step starts compiling the graph with updates
    compiled_when_done(compiled)
    answer_as_before(compiled, cases, before)


@pytest.mark.long
def test_captured_decode_steps_answer_as_the_eager_engine(mt):
    answers_as_eager(mt, "eager")  # torch.compile's graph capture, without inductor's minutes of code generation


@pytest.mark.slow  # inductor compiles for minutes on a 2-core CPU: pytest -m slow
def test_inductor_compiled_decode_steps_answer_as_the_eager_engine(mt):
    answers_as_eager(mt, "inductor")


@pytest.mark.long
@pytest.mark.parametrize("backend, method", [  # slow: inductor compiles for minutes; w4a16's trace adds ~25 s
    ("eager", "w8a16"), pytest.param("eager", "w4a16", marks=pytest.mark.slow),
    pytest.param("inductor", "w8a16", marks=pytest.mark.slow)])
def test_a_quantized_base_decodes_task_steps_compiled_and_as_eager(one_layer_llama, tiny_tokenizer, tmp_path,
                                                                   backend, method):
    """Over a quantized base every task step runs per-token updates: once compiled they run in the graph (captured
    by the "eager" backend: an update left out would change the answers), one graph for any mix of tasks and for a
    new task taking a slot. A blend's steps (its forward hooks) stay eager."""
    torch._dynamo.reset()
    quantized = lora.MultiTaskModel(one_layer_llama, quantized_adapters(one_layer_llama, tmp_path, method), quantize=method)
    ids = [tiny_tokenizer(f"What colour is the {thing}?")["input_ids"] for thing in ("apple", "river", "stone")]
    cases = [([ids[0]], [None]), ([ids[0]], ["qa"]), ([ids[1]], ["sum"]), (ids, ["emb", "qa", None]),
             (ids[:2], ["sum", "emb"])]
    eager = Engine(quantized, max_num_seqs=3)
    expected = [eager.generate(p, t, GREEDY) for p, t in cases]  # every task takes a slot
    assert len({tuple(e[0].new_token_ids) for e in expected[:3]}) == 3  # the tasks change the answer
    compiled = Engine(quantized, max_num_seqs=3, enforce_eager=False, compile_backend=backend)
    compiled_when_done(compiled)
    compiled.generate(*cases[1], GREEDY)  # the first task step starts compiling the graph with updates
    compiled_when_done(compiled)
    answer_as_before(compiled, cases, expected)

    blend = {"qa": 0.5, "sum": 0.5}
    steps, answer = compiled.stats()["compiled_steps_total"], eager.generate([ids[0]], [blend], GREEDY)[0]
    assert compiled.generate([ids[0]], [blend], GREEDY)[0].new_token_ids == answer.new_token_ids
    assert compiled.stats()["compiled_steps_total"] == steps  # hooks: eager

    quantized.add_downstream("new", make_adapter(one_layer_llama, tmp_path / "new", "all-linear", seed=7))
    new = [(ids, ["new", "emb", "qa"])]  # the new task evicts the least recently used one from its slot
    expected = [eager.generate(*new[0], GREEDY)]
    answer_as_before(compiled, new, expected)  # same slots' layout: the same graph, never recompiled
    assert compiled.stats()["compiled_decode"] == "ready"
