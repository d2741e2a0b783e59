"""The engine under faults and hostile settings: no request, callback, sampler fault or overflowing adapter stops
it or fails other requests; a stopped engine fails every request at once; sampling limits are refused clearly."""
import math
import shutil
import threading

import pytest
import torch.nn as nn

import lora
import lora.engine.sampler
from lora.engine import Engine, EngineDead, QueueFull, SamplingParams
from tests.conftest import PROMPT, THINGS, fail_first_sample, make_adapter

GREEDY = SamplingParams(max_tokens=8, min_tokens=8)


@pytest.fixture(scope="module")
def mt(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-adapters")
    return lora.MultiTaskModel(tiny_llama, {"qa": make_adapter(tiny_llama, root / "qa", ["q_proj", "v_proj"], 0),
                                            "sum": make_adapter(tiny_llama, root / "sum", "all-linear", 1)})


def prompt(mt, i):
    return mt.tokenizer(f"What colour is the {THINGS[i % len(THINGS)]}")["input_ids"]


def alone(mt, ids, task, sampling=GREEDY):
    return Engine(mt, max_num_seqs=1).generate([ids], [task], sampling)[0].new_token_ids


def finished(engine, ids, outputs, steps=100):
    for _ in range(steps):
        if all(i in outputs and outputs[i].finished for i in ids):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def overflowing_adapter(base, folder):
    """An adapter every load check accepts (finite weights) whose update overflows float32 in the forward."""
    model = lora.load_model(base)[0]
    lora.inject(model, "all-linear", r=4, alpha=8)
    for layer in lora.lora_layers(model).values():
        nn.init.constant_(layer.lora_B, 1e30)
    return lora.save_adapter(model, folder, task={"prompt_format": PROMPT})


@pytest.mark.parametrize("settings", [dict(temperature=5e-324), dict(temperature=1e-39), dict(temperature=1e-45),
                                      dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_k=10 ** 9),
                                      dict(temperature=1e30)])
def test_extreme_sampling_values_answer_normally(mt, settings):
    sampling = SamplingParams(max_tokens=8, min_tokens=8, seed=1, **settings)
    answer = Engine(mt, max_num_seqs=2).generate([prompt(mt, 0)], ["qa"], sampling)[0]
    assert answer.finish_reason == "length" and len(answer.new_token_ids) == 8
    if settings.get("temperature", 1) < 1e-5 or settings.get("top_p", 1) < 1e-6:
        assert answer.new_token_ids == alone(mt, prompt(mt, 0), "qa")  # greedy, and only the top token kept


def test_a_fault_in_sampling_fails_that_step_only_and_the_engine_keeps_serving(mt, monkeypatch):
    fail_first_sample(monkeypatch)
    engine = Engine(mt, max_num_seqs=2)
    engine.start()
    try:
        first = engine.generate([prompt(mt, 1)], ["qa"], GREEDY)[0]
        assert first.finish_reason == "error" and "injected sampler fault" in str(first.error)
        assert engine.dead is None
        second = engine.generate([prompt(mt, 2)], ["qa"], GREEDY)[0]
        assert second.finish_reason == "length" and second.new_token_ids == alone(mt, prompt(mt, 2), "qa")
    finally:
        engine.shutdown(timeout=30)


def test_a_raising_callback_fails_its_own_request_only(mt):
    engine = Engine(mt, max_num_seqs=2)
    engine.start()
    try:
        seen = []

        def broken(out):
            seen.append(out)
            raise ValueError("the client's callback is broken")
        engine.add_request(prompt(mt, 3), "sum", SamplingParams(max_tokens=30, min_tokens=30), broken)
        answer = engine.generate([prompt(mt, 4)], ["qa"], GREEDY)[0]
        assert answer.new_token_ids == alone(mt, prompt(mt, 4), "qa")
        assert seen[-1].finished and seen[-1].finish_reason == "error" and "callback raised" in str(seen[-1].error)
        assert engine.stats()["running"] == 0 and engine.dead is None
    finally:
        engine.shutdown(timeout=30)


class Crash(BaseException):
    """Not an Exception: escapes every handler of a step, as a bug in the loop itself would."""


def test_a_stopped_engine_fails_every_request_at_once(mt, monkeypatch):
    def crash(logits, batch):
        raise Crash("the engine thread is going down")
    monkeypatch.setattr(lora.engine.sampler, "sample", crash)
    engine = Engine(mt, max_num_seqs=1)
    outputs, done = {}, threading.Event()

    def on_output(out):
        outputs[out.request_id] = out
        if len(outputs) == 2 and all(o.finished for o in outputs.values()):
            done.set()
    running = engine.add_request(prompt(mt, 5), "qa", GREEDY, on_output)
    waiting = engine.add_request(prompt(mt, 6), None, GREEDY, on_output)
    engine.start()
    assert done.wait(60)
    for request_id in (running, waiting):
        assert outputs[request_id].finish_reason == "error" and isinstance(outputs[request_id].error, EngineDead)
    assert isinstance(engine.dead, EngineDead)
    with pytest.raises(EngineDead):
        engine.add_request(prompt(mt, 7), "qa", GREEDY)
    with pytest.raises(EngineDead):
        engine.call(lambda: None).result(timeout=5)
    engine.shutdown(timeout=5)


@pytest.mark.parametrize("mode", ["auto", "mixed", "merged"])
def test_a_task_whose_update_overflows_fails_alone(mt, tiny_llama, tmp_path, mode):
    mt.add_downstream("huge", overflowing_adapter(tiny_llama, tmp_path / "huge"))
    try:
        engine = Engine(mt, max_num_seqs=4, mode=mode)
        outputs = {}
        ids = [engine.add_request(prompt(mt, i), task, GREEDY, lambda o: outputs.__setitem__(o.request_id, o))
               for i, task in enumerate(["qa", "huge", None, "sum"])]
        finished(engine, ids, outputs)
        bad = outputs[ids[1]]
        assert bad.finish_reason == "error" and "'huge'" in str(bad.error) and "not finite" in str(bad.error)
        for i, task in ((0, "qa"), (2, None), (3, "sum")):
            assert outputs[ids[i]].finish_reason == "length", (task, outputs[ids[i]].error)
        answers = engine.generate([prompt(mt, i) for i in (0, 2, 3)], ["qa", None, "sum"], GREEDY)
        assert [a.new_token_ids for a in answers] == [alone(mt, prompt(mt, i), t) for i, t in ((0, "qa"), (2, None),
                                                                                              (3, "sum"))]
    finally:
        mt.remove_downstream("huge")


def test_a_task_that_cannot_load_fails_alone_in_a_mixed_step(mt, tiny_llama, tmp_path):
    folder = make_adapter(tiny_llama, tmp_path / "gone", ["q_proj"], seed=5)
    mt.add_downstream("gone", folder)
    shutil.rmtree(folder)  # registered, read at first use: the step that first needs it cannot
    try:
        engine = Engine(mt, max_num_seqs=4, mode="mixed")
        outputs = {}
        ids = [engine.add_request(prompt(mt, 8), task, GREEDY, lambda o: outputs.__setitem__(o.request_id, o))
               for task in ("gone", "qa")]
        finished(engine, ids, outputs)
        assert outputs[ids[0]].finish_reason == "error"
        assert outputs[ids[1]].finish_reason == "length"
        assert engine.generate([prompt(mt, 8)], ["qa"], GREEDY)[0].new_token_ids == alone(mt, prompt(mt, 8), "qa")
    finally:
        mt.remove_downstream("gone")


def test_waiting_prompt_tokens_have_a_budget(mt):
    ids = prompt(mt, 9)
    engine = Engine(mt, max_num_seqs=1, max_waiting_tokens=2 * len(ids) + 1)
    engine.add_request(ids, None, GREEDY)
    engine.add_request(ids, None, GREEDY)
    with pytest.raises(QueueFull, match="prompt tokens are waiting") as info:
        engine.add_request(ids, None, GREEDY)
    assert info.value.retry_after > 0
    engine.step()  # one is admitted: its tokens leave the waiting budget
    engine.add_request(ids, None, GREEDY)


def test_every_64_bit_seed_has_its_own_stream(mt):
    def sample(seed):
        return alone(mt, prompt(mt, 10), "qa", SamplingParams(max_tokens=16, min_tokens=16, temperature=2.0, seed=seed))
    assert sample(1) != sample(2 ** 32 + 1)
    assert sample(2 ** 63 - 1) != sample(-1)
    assert sample(2 ** 32 + 1) == sample(2 ** 32 + 1)
    batched = Engine(mt, max_num_seqs=4).generate([prompt(mt, 10), prompt(mt, 11)], ["qa", "sum"], [
        SamplingParams(max_tokens=16, min_tokens=16, temperature=2.0, seed=2 ** 40),
        SamplingParams(max_tokens=4, temperature=1.0, top_p=0.5, top_k=5)])
    assert batched[0].new_token_ids == sample(2 ** 40)  # the seed decides, not the neighbours


@pytest.mark.parametrize("settings, field", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens"), (dict(seed=1.5), "seed"), (dict(stop=["x"] * 17), "stop"),
    (dict(stop="x" * 300), "stop"), (dict(stop=[1]), "stop")])
def test_sampling_limits_are_refused_naming_the_field(settings, field):
    with pytest.raises(lora.LoraError, match=field):
        SamplingParams(**settings).check()


def test_sampling_defaults_are_normalised():
    checked = SamplingParams(top_k=-1, stop="end").check()
    assert checked.top_k == 0 and checked.stop == ("end",)


def test_prompt_ids_outside_the_vocabulary_are_refused(mt):
    engine = Engine(mt, max_num_seqs=1)
    for ids in ([-1], [10 ** 6], [1.5], [10 ** 30]):
        with pytest.raises(lora.LoraError, match="token ids from 0"):
            engine.add_request(ids, None, GREEDY)


def test_stats_name_the_running_and_waiting_adapters(mt):
    engine = Engine(mt, max_num_seqs=1, max_loras=2)
    engine.add_request(prompt(mt, 0), "qa", GREEDY)
    engine.add_request(prompt(mt, 1), "sum", GREEDY)
    engine.step()
    stats = engine.stats()
    assert stats["running_lora_adapters"] == ["qa"] and stats["waiting_lora_adapters"] == ["sum"]
    assert stats["max_lora"] == 2


def test_a_failed_request_leaves_nothing_in_the_cache_for_the_next_one(mt, tiny_llama, tmp_path):
    mt.add_downstream("huge", overflowing_adapter(tiny_llama, tmp_path / "huge"))
    try:
        engine = Engine(mt, max_num_seqs=2)
        long_prompt = mt.tokenizer(" ".join(["What colour is the"] + THINGS))["input_ids"]
        failed = engine.generate([long_prompt], ["huge"], GREEDY)[0]
        assert failed.finish_reason == "error"
        # The next request takes the same slot, beside a longer one: it attends over masked positions there.
        short, longer = engine.generate([prompt(mt, 1), long_prompt[:20]], ["qa", "qa"], GREEDY)
        assert short.finish_reason == "length", short.error
        assert short.new_token_ids == alone(mt, prompt(mt, 1), "qa")
    finally:
        mt.remove_downstream("huge")


def test_shutdown_with_a_timeout_aborts_what_is_still_running(mt):
    engine = Engine(mt, max_num_seqs=1)
    outputs, first = {}, threading.Event()

    def on_output(out):
        outputs[out.request_id] = out
        first.set()
    running = engine.add_request(prompt(mt, 1), "qa", SamplingParams(max_tokens=200, min_tokens=200), on_output)
    waiting = engine.add_request(prompt(mt, 2), "qa", SamplingParams(max_tokens=200, min_tokens=200), on_output)
    engine.start()
    assert first.wait(60)
    engine.shutdown(timeout=0.01)
    assert outputs[running].finish_reason == "abort" and outputs[waiting].finish_reason == "abort"
    assert outputs[running].num_tokens < 200


def test_a_task_registered_again_runs_its_new_weights_in_mixed_steps(mt, tiny_llama, tmp_path):
    mt.add_downstream("again", make_adapter(tiny_llama, tmp_path / "a", ["q_proj", "v_proj"], seed=3))
    try:
        engine = Engine(mt, max_num_seqs=4, mode="mixed")
        engine.generate([prompt(mt, 1), prompt(mt, 2)], ["again", "qa"], GREEDY)
        new = make_adapter(tiny_llama, tmp_path / "b", ["q_proj", "v_proj"], seed=4)
        engine.call(lambda: mt.add_downstream("again", new)).result(timeout=60)
        answer = engine.generate([prompt(mt, 1), prompt(mt, 2)], ["again", "qa"], GREEDY)[0]
        assert answer.new_token_ids == alone(mt, prompt(mt, 1), "again")
    finally:
        mt.remove_downstream("again")
