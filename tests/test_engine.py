"""The continuous-batching engine: join and leave between steps, cancellation, cache back-pressure,
per-token task isolation, sampling, and answers equal to the same request alone (float32)."""
import threading

import pytest
import torch

import lora
from lora.engine import Engine, QueueFull, SamplingParams, kv_bytes_per_token
from tests.conftest import THINGS, make_adapter

GREEDY = SamplingParams(max_tokens=12, min_tokens=12)  # a fixed length: no early eos on random models


def engine_tasks(base, root):
    """`base` with three random tasks: two attention projections, every linear layer, the embeddings and o_proj."""
    targets = {"qa": ["q_proj", "v_proj"], "sum": "all-linear", "emb": ["embed_tokens", "o_proj"]}
    mapper = {name: make_adapter(base, root / name, t, seed) for seed, (name, t) in enumerate(targets.items())}
    return lora.MultiTaskModel(base, mapper)


@pytest.fixture(scope="module")
def mt(tiny_llama, tmp_path_factory):
    return engine_tasks(tiny_llama, tmp_path_factory.mktemp("engine-adapters"))


def prompt(mt, i, words=1):
    return mt.tokenizer(" ".join(["What colour is the"] + [THINGS[(i + k) % len(THINGS)] for k in range(words)]))[
        "input_ids"]


def alone(mt, ids, task, sampling=GREEDY):
    return Engine(mt, max_num_seqs=1).generate([ids], [task], sampling)[0].new_token_ids


def run_until_done(engine, outputs, ids, steps=200):
    """Step a foreground engine until every request id in `ids` has its final Output in `outputs`."""
    for _ in range(steps):
        engine.step()
        if all(i in outputs and outputs[i].finished for i in ids):
            return outputs
    raise AssertionError("requests did not finish")


def collector():
    """(last Output per request id, every token id per request id, the callback that fills both)."""
    outputs, tokens = {}, {}

    def on_output(out):
        outputs[out.request_id] = out
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs, tokens, on_output


def test_mixed_tasks_and_staggered_arrivals_answer_as_each_request_alone(mt):
    tasks = ["qa", None, "sum", "emb", "qa", {"qa": 0.5, "sum": 0.5}, "sum", None]
    prompts = [prompt(mt, i, 1 + i % 4) for i in range(len(tasks))]
    engine = Engine(mt, max_num_seqs=4, max_prefill_tokens=6, merge_after=2)
    outputs, tokens, on_output = collector()
    ids = []
    for ids_, task in zip(prompts, tasks):  # a new request every other step
        ids.append(engine.add_request(ids_, task, GREEDY, on_output))
        engine.step()
        engine.step()
    run_until_done(engine, outputs, ids)
    for i, (ids_, task) in enumerate(zip(prompts, tasks)):
        assert tokens[ids[i]] == alone(mt, ids_, task), f"request {i} ({task})"
    # The adapters matter: one prompt answered differently per task.
    answers = {str(t): tuple(alone(mt, prompts[0], t)) for t in ("qa", "sum", "emb", None)}
    assert len(set(answers.values())) == 4


def test_short_request_joins_and_leaves_while_a_long_one_runs(mt):
    engine = Engine(mt, max_num_seqs=4)
    outputs, tokens, on_output = collector()
    long_id = engine.add_request(prompt(mt, 0, 3), "qa", SamplingParams(max_tokens=60, min_tokens=60), on_output)
    for _ in range(10):
        engine.step()
    short_id = engine.add_request(prompt(mt, 1), "sum", SamplingParams(max_tokens=3, min_tokens=3), on_output)
    steps = 0
    while not (short_id in outputs and outputs[short_id].finished):
        engine.step()
        steps += 1
    assert steps == 3  # prefill + first token, then two decode steps: it never waited for the long one
    assert not outputs[long_id].finished and engine.stats()["running"] == 1
    assert tokens[short_id] == alone(mt, prompt(mt, 1), "sum", SamplingParams(max_tokens=3, min_tokens=3))


def test_chunked_prefill_keeps_decoding_others_every_step(mt):
    engine = Engine(mt, max_num_seqs=2, max_prefill_tokens=4)
    outputs, tokens, on_output = collector()
    first = engine.add_request(prompt(mt, 2), None, SamplingParams(max_tokens=40, min_tokens=40), on_output)
    while first not in outputs:  # its own prompt takes two steps of 4 tokens
        engine.step()
    long_prompt = prompt(mt, 3, words=12)
    second = engine.add_request(long_prompt, "qa", GREEDY, on_output)
    for step in range(len(long_prompt) // 4):
        before = len(tokens[first])
        engine.step()
        assert len(tokens[first]) == before + 1, f"decoding stalled at step {step}"
    run_until_done(engine, outputs, [first, second])
    assert tokens[second] == alone(mt, long_prompt, "qa")


def test_abort_frees_the_slot_at_the_next_step(mt):
    engine = Engine(mt, max_num_seqs=2)
    outputs, tokens, on_output = collector()
    gone = engine.add_request(prompt(mt, 4), "qa", SamplingParams(max_tokens=50, min_tokens=50), on_output)
    kept = engine.add_request(prompt(mt, 5), "sum", GREEDY, on_output)
    waiting = engine.add_request(prompt(mt, 6), None, GREEDY, on_output)
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    engine.abort(gone)
    engine.step()
    assert outputs[gone].finished and outputs[gone].finish_reason == "abort"
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 0  # the freed slot was taken at once
    run_until_done(engine, outputs, [kept, waiting])
    assert tokens[kept] == alone(mt, prompt(mt, 5), "sum")
    assert tokens[waiting] == alone(mt, prompt(mt, 6), None)


def test_cache_budget_makes_requests_wait_instead_of_failing(mt):
    slot_bytes = 64 * kv_bytes_per_token(mt.pretrained_model.config, mt.dtype)  # one sequence of 64 tokens
    engine = Engine(mt, max_num_seqs=16, max_model_len=64, kv_cache_bytes=2.5 * slot_bytes)
    outputs, tokens, on_output = collector()
    ids = [engine.add_request(prompt(mt, i), ["qa", "sum", None][i % 3], GREEDY, on_output) for i in range(5)]
    peak = 0
    while not all(i in outputs and outputs[i].finished for i in ids):
        engine.step()
        peak = max(peak, engine.stats()["running"])
    assert peak == 2
    for i, request_id in enumerate(ids):
        assert tokens[request_id] == alone(mt, prompt(mt, i), ["qa", "sum", None][i % 3])
    with pytest.raises(lora.LoraError, match="holds no sequence"):
        Engine(mt, max_model_len=64, kv_cache_bytes=slot_bytes / 2)


def test_a_full_waiting_queue_is_refused_with_retry_after(mt):
    engine = Engine(mt, max_num_seqs=1, max_waiting=1)
    engine.add_request(prompt(mt, 0), None, GREEDY)
    with pytest.raises(QueueFull) as info:
        engine.add_request(prompt(mt, 1), None, GREEDY)
    assert info.value.retry_after > 0


def test_bad_requests_are_refused_before_they_queue(mt):
    engine = Engine(mt, max_num_seqs=1, max_model_len=32)
    with pytest.raises(lora.LoraError, match="unknown downstream task 'nope'"):
        engine.add_request(prompt(mt, 0), "nope", GREEDY)
    with pytest.raises(lora.LoraError, match="maximum context length is 32"):
        engine.add_request(prompt(mt, 0), None, SamplingParams(max_tokens=30))
    with pytest.raises(lora.LoraError, match="prompt is empty"):
        engine.add_request([], None, GREEDY)
    with pytest.raises(lora.LoraError, match="top_p"):
        engine.add_request(prompt(mt, 0), None, SamplingParams(top_p=0))
    assert engine.stats()["waiting"] == 0


def test_per_token_updates_do_not_depend_on_the_neighbours_tasks(mt):
    ids = mt.tokenizer(["What colour is the lamp"] * 2, return_tensors="pt")["input_ids"]

    def first_row_beside(other):  # row 0 uses "qa", row 1 the other task
        mixed = mt.mix(["qa", other])
        mixed.select(torch.tensor([[1], [2]]))
        with mt.apply_downstream(None) as model, mixed.attached():
            return model(ids).logits[0]
    with torch.no_grad():
        qa_beside_sum, qa_beside_emb = first_row_beside("sum"), first_row_beside("emb")
        with mt.apply_downstream("qa") as model:
            qa_merged = model(ids[:1]).logits[0]
    torch.testing.assert_close(qa_beside_sum, qa_beside_emb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qa_beside_sum, qa_merged, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_per_request_seed(mt):
    hot = SamplingParams(max_tokens=16, min_tokens=16, temperature=1.5, seed=7)
    engine = Engine(mt, max_num_seqs=4)
    same = engine.generate([prompt(mt, 0)] * 3, ["qa", "sum", "qa"], [hot, SamplingParams(max_tokens=5), hot])
    assert same[0].new_token_ids == same[2].new_token_ids  # the seed, not the batch neighbours, decides
    other = alone(mt, prompt(mt, 0), "qa", SamplingParams(max_tokens=16, min_tokens=16, temperature=1.5, seed=8))
    assert other != same[0].new_token_ids
    top1 = SamplingParams(max_tokens=12, min_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert alone(mt, prompt(mt, 1), "qa", top1) == alone(mt, prompt(mt, 1), "qa")
    tiny_p = SamplingParams(max_tokens=12, min_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert alone(mt, prompt(mt, 1), "qa", tiny_p) == alone(mt, prompt(mt, 1), "qa")


def test_eos_min_tokens_ignore_eos_and_stop_strings(mt, monkeypatch):
    ids = prompt(mt, 2)
    free = alone(mt, ids, "qa", SamplingParams(max_tokens=12, ignore_eos=True))
    eos = free[4]  # pretend the 5th greedy token ends an answer
    monkeypatch.setattr(mt.pretrained_model.generation_config, "eos_token_id", eos)
    stops = Engine(mt, max_num_seqs=1).generate([ids] * 3, ["qa"] * 3, [
        SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, min_tokens=8),
        SamplingParams(max_tokens=12, ignore_eos=True)])
    assert stops[0].finish_reason == "stop" and stops[0].new_token_ids == free[:free.index(eos) + 1]
    assert len(stops[1].new_token_ids) >= 8
    assert stops[2].finish_reason == "length" and stops[2].new_token_ids == free
    text = mt.tokenizer.decode(free, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    monkeypatch.undo()
    cut = Engine(mt, max_num_seqs=1).generate([ids], ["qa"], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]


def test_background_engine_streams_deltas_and_unloads_between_steps(mt, tiny_llama, tmp_path):
    mt.add_downstream("extra", make_adapter(tiny_llama, tmp_path / "extra", ["q_proj"], seed=9))
    engine = Engine(mt, max_num_seqs=4)
    engine.start()
    try:
        deltas, done = [], threading.Event()

        def on_output(out):
            deltas.append(out.delta)
            if out.finished:
                done.set()
        engine.add_request(prompt(mt, 3), "qa", SamplingParams(max_tokens=20, min_tokens=20), on_output)
        assert done.wait(60)
        assert "".join(deltas) == mt.tokenizer.decode(alone(mt, prompt(mt, 3), "qa", SamplingParams(
            max_tokens=20, min_tokens=20)), skip_special_tokens=True)
        finished = threading.Event()
        result = {}

        def on_extra(out):
            if out.finished:
                result["out"] = out
                finished.set()
        engine.add_request(prompt(mt, 4), "extra", SamplingParams(max_tokens=200, min_tokens=200), on_extra)
        engine.call(lambda: mt.remove_downstream("extra")).result(timeout=60)
        assert finished.wait(60)
        assert result["out"].finish_reason == "error" and "unloaded" in str(result["out"].error)
    finally:
        engine.shutdown()


def test_a_shared_prompt_prefix_is_computed_once_per_task(mt, tiny_llama, tmp_path):
    head = prompt(mt, 7, words=10)
    first, second = head + prompt(mt, 1), head + prompt(mt, 2)
    engine = Engine(mt, max_num_seqs=2, block_size=4)
    engine.generate([first], ["qa"], GREEDY)
    before = engine.stats()
    answer = engine.generate([second], ["qa"], GREEDY)[0]
    after = engine.stats()
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) // 4 * 4  # whole blocks
    assert shared >= 8
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == len(second) - shared
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == shared
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(second)
    assert 0 < after["prefix_cache_usage"] <= 1
    assert answer.new_token_ids == alone(mt, second, "qa")
    # K and V depend on the adapter: another task computes the whole prompt
    assert engine.generate([second], ["sum"], GREEDY)[0].new_token_ids == alone(mt, second, "sum")
    assert engine.stats()["prompt_tokens_total"] - after["prompt_tokens_total"] == len(second)
    # a task registered again under the same name is other weights: nothing of the old one is reused
    mt.add_downstream("again", make_adapter(tiny_llama, tmp_path / "a", ["q_proj"], seed=3))
    engine.generate([second], ["again"], GREEDY)
    engine.call(lambda: mt.add_downstream("again", make_adapter(tiny_llama, tmp_path / "b", ["v_proj"], seed=4)))
    try:
        assert engine.generate([second], ["again"], GREEDY)[0].new_token_ids == alone(mt, second, "again")
    finally:
        mt.remove_downstream("again")


def test_a_blend_is_not_starved_by_a_steady_stream_of_one_task(mt):
    engine = Engine(mt, max_num_seqs=2, aging_steps=4)
    outputs, tokens, on_output = collector()
    short = SamplingParams(max_tokens=3, min_tokens=3)
    engine.add_request(prompt(mt, 0), "qa", short, on_output)
    engine.step()
    blend = engine.add_request(prompt(mt, 1), {"qa": 0.5, "sum": 0.5}, GREEDY, on_output)
    for step in range(60):  # a new "qa" request every step: there is always one running
        engine.add_request(prompt(mt, 2 + step % 5), "qa", short, on_output)
        engine.step()
        if blend in outputs and outputs[blend].finished:
            break
    assert outputs[blend].finish_reason == "length"
    assert tokens[blend] == alone(mt, prompt(mt, 1), {"qa": 0.5, "sum": 0.5})
