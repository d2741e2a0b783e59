"""Prefix caching: a prompt's cached blocks (per task) are reused by later and concurrent requests (those sent
together wait for the first to compute them), survive their slot, stay within their memory budget, and every answer
equals the same request alone (float32)."""
import pytest
import torch

from lora.engine import Engine, SamplingParams, kv_bytes_per_token
from tests.conftest import fail_first_sample
from tests.test_engine import GREEDY, alone, collector, mt, prompt, run_until_done  # noqa: F401 - mt: a fixture

BLOCK = 4


def shared_blocks(a, b):
    """Tokens of whole blocks that a and b share, within b's prompt but its last token (which always runs)."""
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(shared, len(b) - 1) // BLOCK * BLOCK


@pytest.fixture()
def head(mt):  # noqa: F811 - the fixture imported above
    return prompt(mt, 7, words=10)


def test_a_running_requests_prefix_serves_requests_that_arrive_while_it_runs(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=4, block_size=BLOCK)
    outputs, tokens, on_output = collector()
    first = head + prompt(mt, 1)
    long_id = engine.add_request(first, "qa", SamplingParams(max_tokens=30, min_tokens=30), on_output)
    engine.step()  # its prompt is computed; it keeps decoding
    others = [head + prompt(mt, i) for i in (2, 3, 4)]
    ids = [engine.add_request(p, "qa", GREEDY, on_output) for p in others]
    before = engine.stats()
    run_until_done(engine, outputs, ids)
    assert not outputs[long_id].finished  # the three were served while the first still ran
    hits = engine.stats()["prefix_cache_hits"] - before["prefix_cache_hits"]
    assert hits == sum(shared_blocks(first, p) for p in others) and hits >= 3 * 8
    run_until_done(engine, outputs, [long_id])
    assert tokens[long_id] == alone(mt, first, "qa", SamplingParams(max_tokens=30, min_tokens=30))
    for i, p in zip(ids, others):
        assert tokens[i] == alone(mt, p, "qa")


def test_a_cached_prefix_outlives_its_slot_and_is_kept_per_task(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=1, block_size=BLOCK)
    first, second = head + prompt(mt, 1), head + prompt(mt, 2)
    engine.generate([first], ["qa"], GREEDY)
    other = prompt(mt, 5, words=6)[::-1]  # shares no block with `second`
    engine.generate([other], ["sum"], GREEDY)  # another task's request takes the only slot
    before = engine.stats()
    assert engine.generate([second], ["qa"], GREEDY)[0].new_token_ids == alone(mt, second, "qa")
    assert engine.stats()["prefix_cache_hits"] - before["prefix_cache_hits"] == shared_blocks(first, second)
    # the same tokens under another task are other K/V: no hit until that task computed them
    before = engine.stats()
    assert engine.generate([second], ["sum"], GREEDY)[0].new_token_ids == alone(mt, second, "sum")
    assert engine.stats()["prefix_cache_hits"] == before["prefix_cache_hits"]


def test_a_chat_turn_reuses_the_previous_turns_answer(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=2, block_size=BLOCK)
    answer = engine.generate([head], ["qa"], GREEDY)[0].new_token_ids
    follow_up = head + answer + prompt(mt, 3)
    before = engine.stats()
    assert engine.generate([follow_up], ["qa"], GREEDY)[0].new_token_ids == alone(mt, follow_up, "qa")
    # the answer's last token was never fed back, so its K/V are not cached: the blocks before it are
    cached = (len(head) + len(answer) - 1) // BLOCK * BLOCK
    assert engine.stats()["prefix_cache_hits"] - before["prefix_cache_hits"] == cached


def test_the_prefix_cache_stays_within_its_bytes_and_evicts_least_recently_used(mt):  # noqa: F811
    block_bytes = BLOCK * kv_bytes_per_token(mt.pretrained_model.config, torch.float32)
    engine = Engine(mt, max_num_seqs=1, block_size=BLOCK, prefix_cache_bytes=3 * block_bytes)
    once = SamplingParams(max_tokens=1)
    three, two = prompt(mt, 0, words=12)[:3 * BLOCK + 1], prompt(mt, 9, words=12)[::-1][:2 * BLOCK + 1]
    engine.generate([three], ["qa"], once)
    assert engine.stats()["prefix_cache_usage"] == 1.0  # three blocks: the pool is full
    engine.generate([two], ["qa"], once)  # takes two blocks: the deepest two of `three` go, its first stays
    before = engine.stats()
    assert engine.generate([three], ["qa"], GREEDY)[0].new_token_ids == alone(mt, three, "qa")
    assert engine.stats()["prefix_cache_hits"] - before["prefix_cache_hits"] == BLOCK
    assert engine.stats()["prefix_cache_usage"] == 1.0
    with pytest.raises(Exception, match="holds no block"):
        Engine(mt, block_size=BLOCK, prefix_cache_bytes=block_bytes - 1)


def test_prefix_caching_off_computes_every_prompt(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=2, block_size=BLOCK, enable_prefix_caching=False)
    first, second = head + prompt(mt, 1), head + prompt(mt, 2)
    engine.generate([first], ["qa"], GREEDY)
    assert engine.generate([second], ["qa"], GREEDY)[0].new_token_ids == alone(mt, second, "qa")
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 0 and stats["prefix_cache_usage"] == 0
    assert stats["prompt_tokens_total"] == len(first) + len(second)


def test_a_prefix_cache_that_cannot_be_allocated_turns_itself_off_and_fails_no_request(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=2, block_size=BLOCK, prefix_cache_bytes=1 << 62)  # far past any machine
    prompts = [head + prompt(mt, 1), head + prompt(mt, 2)]
    for p in prompts:  # the first store fails: caching stops, the request and the engine go on
        answer = engine.generate([p], ["qa"], GREEDY)[0]
        assert answer.error is None and answer.new_token_ids == alone(mt, p, "qa")
    assert engine.dead is None
    assert engine.stats()["prefix_cache_hits"] == 0 and engine.stats()["prefix_cache_usage"] == 0


def test_requests_sent_together_take_the_shared_prefix_from_the_first_instead_of_computing_it(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=8, block_size=BLOCK)
    prompts = [head + prompt(mt, i) for i in range(5)]
    tasks = ["qa"] * 4 + ["sum"]  # the same tokens under another task are other K/V: it computes them
    answers = engine.generate(prompts, tasks, GREEDY)
    stats = engine.stats()
    shared = [shared_blocks(prompts[0], p) for p in prompts[1:4]]
    assert min(shared) >= 8 and stats["prefix_cache_hits"] == sum(shared)
    assert stats["prompt_tokens_total"] == sum(map(len, prompts)) - sum(shared)
    for answer, p, task in zip(answers, prompts, tasks):
        assert answer.new_token_ids == alone(mt, p, task)


def test_a_request_waiting_for_a_prefix_does_not_delay_an_unrelated_one_behind_it(mt, head):  # noqa: F811
    first, same, unrelated = head + prompt(mt, 1), head + prompt(mt, 2), prompt(mt, 3)[::-1]
    engine = Engine(mt, max_num_seqs=4, block_size=BLOCK, max_prefill_tokens=len(first) + len(unrelated))
    outputs, tokens, on_output = collector()
    ids = [engine.add_request(p, t, GREEDY, on_output) for p, t in ((first, "qa"), (same, "qa"), (unrelated, "sum"))]
    engine.step()  # first's and unrelated's prompts fill the step; same waits for first's blocks
    assert ids[0] in tokens and ids[2] in tokens and ids[1] not in tokens
    assert engine.stats()["waiting"] == 1
    run_until_done(engine, outputs, ids)
    assert engine.stats()["prefix_cache_hits"] == shared_blocks(first, same)
    for i, p, task in zip(ids, (first, same, unrelated), ("qa", "qa", "sum")):
        assert tokens[i] == alone(mt, p, task)


def test_aborting_the_request_others_wait_for_lets_them_compute_it(mt, head):  # noqa: F811
    engine = Engine(mt, max_num_seqs=4, block_size=BLOCK, max_prefill_tokens=2 * BLOCK)
    outputs, tokens, on_output = collector()
    prompts = [head + prompt(mt, i) for i in range(3)]
    ids = [engine.add_request(p, "qa", GREEDY, on_output) for p in prompts]
    engine.step()  # the first prefills its first two blocks; the others wait for the rest
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 2
    engine.abort(ids[0])
    engine.step()  # the next one computes the rest itself (the third now waits for it)
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    run_until_done(engine, outputs, ids[1:])
    assert outputs[ids[0]].finish_reason == "abort"
    for i, p in zip(ids[1:], prompts[1:]):
        assert outputs[i].finish_reason == "length" and tokens[i] == alone(mt, p, "qa")


def test_a_failed_prefill_lets_the_requests_that_waited_for_it_compute_it(mt, head, monkeypatch):  # noqa: F811
    fail_first_sample(monkeypatch)
    prompts = [head + prompt(mt, i) for i in range(3)]
    answers = Engine(mt, max_num_seqs=4, block_size=BLOCK).generate(prompts, ["qa"] * 3, GREEDY)
    assert answers[0].finish_reason == "error" and "injected sampler fault" in str(answers[0].error)
    monkeypatch.undo()
    for answer, p in zip(answers[1:], prompts[1:]):
        assert answer.finish_reason == "length" and answer.new_token_ids == alone(mt, p, "qa")
