"""The scheduler alone, on fake requests and a fake KV cache: admission, chunked prefill, task sharing, aging,
prefix holds."""
import numpy as np
import pytest

from lora.engine import QueueFull, SamplingParams
from lora.engine.request import Request
from lora.engine.scheduler import Reuse, Scheduler
from lora.errors import LoraError


class Slots:
    """A KV cache with room for `n` requests."""

    def __init__(self, n):
        self.n, self.held = n, set()

    def allocate(self, request):
        if len(self.held) >= self.n:
            return False
        self.held.add(request.request_id)
        return True

    def free(self, request):
        self.held.discard(request.request_id)

    def reuse(self, request):
        return Reuse(0, 0)


class Blocks(Slots):
    """Slots, and a prefix cache of 4-token blocks: every block a request has computed stays cached; a running request
    still prefilling will store the rest of its prompt's blocks."""

    def __init__(self, n):
        super().__init__(n)
        self.requests = {}  # every admitted request: its computed whole blocks are cached (for ever, in this fake)

    def allocate(self, request):
        if not super().allocate(request):
            return False
        self.requests[request.request_id] = request
        request.computed = self.reuse(request).cached  # the real cache copies the cached prefix in
        return True

    def reuse(self, request):
        def shared(other, upto):  # whole blocks of the prompt (but its last token) that `other` holds up to `upto`
            a, b = request.prompt[:-1], other.prompt[:upto]
            n = min(len(a), len(b))
            same = next((i for i in range(n) if a[i] != b[i]), n)
            return same // 4 * 4 if other.spec == request.spec else 0
        cached = max((shared(r, r.computed) for r in self.requests.values()), default=0)
        coming = max((shared(r, len(r.prompt)) for r in self.requests.values()
                      if r.request_id in self.held and not r.decoding), default=0)
        return Reuse(cached, max(0, coming - cached))


def can_mix(spec):
    return spec is None or (len(spec) == 1 and spec[0][1] == 1.0)


def request(name, task=None, prompt=4, start=0):
    """A request for the base (None), a task ("qa") or an even blend of tasks ("qa+sum"); its prompt counts up from
    `start` (so prompts of one start share their beginning)."""
    parts = sorted(task.split("+")) if task else []
    spec = tuple((t, 1.0 / len(parts)) for t in parts) or None
    return Request(name, np.arange(start, start + prompt, dtype=np.int32), spec, SamplingParams())


def run(scheduler, steps=1, finish=()):
    """Plan `steps` steps, marking each planned chunk computed and finishing the named requests."""
    plan = None
    for _ in range(steps):
        plan = scheduler.schedule()
        for chunk in plan.chunks:
            chunk.request.computed = chunk.end
        for r in scheduler.running:
            if r.request_id in finish:
                r.done.set()
        scheduler.release()
    return plan


def names(requests):
    return [r.request_id for r in requests]


def test_first_come_first_served_into_kv_capacity_then_wait():
    kv = Slots(2)
    scheduler = Scheduler(kv, can_mix, max_num_seqs=8)
    for name in "abc":
        scheduler.add(request(name))
    run(scheduler)
    assert names(scheduler.running) == ["a", "b"] and names(scheduler.waiting) == ["c"]
    run(scheduler, finish={"a"})
    run(scheduler)
    assert names(scheduler.running) == ["b", "c"] and kv.held == {"b", "c"}


def test_chunked_prefill_puts_decode_rows_first_and_bounds_prompt_tokens():
    scheduler = Scheduler(Slots(4), can_mix, max_prefill_tokens=6)
    scheduler.add(request("short", prompt=3))
    run(scheduler)  # its whole prompt in one step: it decodes from now on
    scheduler.add(request("long", prompt=10))
    scheduler.add(request("next", prompt=5))
    plan = scheduler.schedule()
    assert names(plan.decode) == ["short"]
    assert [(c.request.request_id, c.start, c.end) for c in plan.chunks] == [("long", 0, 6)]
    assert names(plan.sampled) == ["short"]  # the long prompt is not finished: no token for it yet
    for chunk in plan.chunks:
        chunk.request.computed = chunk.end
    plan = scheduler.schedule()
    assert [(c.request.request_id, c.start, c.end) for c in plan.chunks] == [("long", 6, 10), ("next", 0, 2)]
    assert names(plan.sampled) == ["short", "long"]


def test_single_tasks_share_a_step_and_blends_run_alone():
    scheduler = Scheduler(Slots(8), can_mix)
    for name, task in (("a", "qa"), ("b", None), ("c", "sum"), ("d", "qa+sum"), ("e", "qa")):
        scheduler.add(request(name, task))
    run(scheduler)
    assert names(scheduler.running) == ["a", "b", "c", "e"] and names(scheduler.waiting) == ["d"]
    run(scheduler, finish={"a", "b", "c", "e"})
    run(scheduler)
    assert names(scheduler.running) == ["d"]


def test_merged_mode_runs_one_task_at_a_time():
    scheduler = Scheduler(Slots(8), can_mix, mode="merged")
    for name, task in (("a", "qa"), ("b", "sum"), ("c", "qa")):
        scheduler.add(request(name, task))
    run(scheduler)
    assert names(scheduler.running) == ["a", "c"]


def test_max_loras_bounds_the_tasks_of_a_step():
    scheduler = Scheduler(Slots(8), can_mix, max_loras=2)
    for name, task in (("a", "qa"), ("b", "sum"), ("c", "emb"), ("d", None), ("e", "qa")):
        scheduler.add(request(name, task))
    run(scheduler)
    assert names(scheduler.running) == ["a", "b", "d", "e"]
    with pytest.raises(LoraError, match="max_loras"):
        Scheduler(Slots(8), can_mix, max_loras=1).add(request("blend", "qa+sum"))


def test_a_steady_stream_of_one_task_cannot_starve_a_blend():
    scheduler = Scheduler(Slots(4), can_mix, aging_steps=5)
    scheduler.add(request("first", "qa"))
    run(scheduler)
    scheduler.add(request("blend", "qa+sum"))
    admitted_after_aging, step = [], 0
    while "blend" not in names(scheduler.running):
        step += 1
        assert step < 50, "the blend starved"
        scheduler.add(request(f"qa{step}", "qa"))
        before = set(names(scheduler.running))
        # each qa request runs 3 steps; new ones keep arriving
        finish = {r.request_id for r in scheduler.running if scheduler.steps - r.arrival >= 3}
        run(scheduler, finish=finish)
        if step > 5:
            admitted_after_aging += sorted(set(names(scheduler.running)) - before)
    assert admitted_after_aging in ([], ["blend"])  # once aged, nothing queued after it went ahead
    assert names(scheduler.running) == ["blend"]


def test_waiting_budgets_refuse_with_queue_full():
    scheduler = Scheduler(Slots(1), can_mix, max_waiting=2, max_waiting_tokens=10)
    scheduler.add(request("a", prompt=4))
    with pytest.raises(QueueFull, match="prompt tokens"):
        scheduler.add(request("b", prompt=7))
    scheduler.add(request("b", prompt=6))
    with pytest.raises(QueueFull, match="requests are waiting"):
        scheduler.add(request("c", prompt=1))
    run(scheduler)  # "a" is admitted: its 4 tokens no longer count
    assert scheduler.waiting_tokens == 6
    scheduler.add(request("c", prompt=4))
    with pytest.raises(LoraError, match="over the 10 prompt tokens"):  # never fits: a 400, not a 429
        Scheduler(Slots(1), can_mix, max_waiting_tokens=10).add(request("d", prompt=11))


def chunks(plan):
    return [(c.request.request_id, c.start, c.end) for c in plan.chunks]


def test_a_request_waits_for_the_prefix_a_running_request_is_prefilling_and_others_go_ahead():
    scheduler = Scheduler(Blocks(8), can_mix, max_prefill_tokens=16)
    scheduler.add(request("first", "qa", prompt=40))
    scheduler.add(request("same", "qa", prompt=42))  # its first 40 tokens are first's: 10 blocks
    scheduler.add(request("other task", "sum", prompt=6))  # the same tokens, other K/V: nothing to wait for
    scheduler.add(request("unrelated", "qa", prompt=6, start=100))
    assert chunks(run(scheduler)) == [("first", 0, 16)]
    assert names(scheduler.running) == ["first", "other task", "unrelated"] and names(scheduler.waiting) == ["same"]
    assert chunks(run(scheduler)) == [("first", 16, 32)]
    # 32 of its tokens are cached, 8 are coming, 10 left to compute: it still waits
    assert chunks(run(scheduler)) == [("first", 32, 40), ("other task", 0, 6), ("unrelated", 0, 2)]
    assert names(scheduler.waiting) == ["same"]
    plan = run(scheduler)  # first's prompt is stored: same joins and computes its last 2 tokens only, ahead of
    assert names(plan.decode) == ["first", "other task"]  # those queued after it (it kept its place in the queue)
    assert chunks(plan) == [("same", 40, 42), ("unrelated", 2, 6)]
    assert not scheduler.waiting


def test_a_request_waits_only_for_most_of_its_prompt_and_never_longer_than_its_holder_or_aging_steps():
    scheduler = Scheduler(Blocks(8), can_mix, max_prefill_tokens=4, aging_steps=3)
    scheduler.add(request("first", "qa", prompt=40))
    scheduler.add(request("longer", "qa", prompt=100))  # 40 of 100 tokens are coming: it computes them itself
    scheduler.add(request("same", "qa", prompt=42))
    run(scheduler, steps=3)
    assert names(scheduler.running) == ["first", "longer"] and names(scheduler.waiting) == ["same"]
    run(scheduler)  # it has waited aging_steps: it computes what is still coming itself
    assert names(scheduler.running) == ["first", "longer", "same"]
    assert scheduler.running[2].computed == 12  # the blocks first had stored

    scheduler = Scheduler(Blocks(8), can_mix, max_prefill_tokens=4)
    scheduler.add(request("first", "qa", prompt=40))
    scheduler.add(request("same", "qa", prompt=42))
    run(scheduler, finish={"first"})  # aborted mid-prefill: its 4 stored tokens stay cached, no more are coming
    assert names(scheduler.waiting) == ["same"]
    assert chunks(run(scheduler)) == [("same", 4, 8)]
