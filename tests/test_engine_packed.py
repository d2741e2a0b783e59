"""Prepacked weights (engine.packed): batched decode steps on packed copies answer as each request alone, and the
copies follow the weights exact switching points at (merged tasks, mixed steps on the base, a re-registered task);
a single stream's layers split across threads answer as PyTorch's linear does."""
import torch

import lora
from lora.engine import Engine
from tests.conftest import make_adapter
from tests.test_engine import GREEDY, alone, mt, prompt  # noqa: F401 - mt: a fixture


def answers(engine, prompts, tasks):
    return [out.new_token_ids for out in engine.generate(prompts, tasks, GREEDY)]


def test_batched_decode_on_packed_weights_answers_as_alone_across_switches(mt):  # noqa: F811
    engine = Engine(mt, max_num_seqs=4, merge_after=1)
    prompts = [prompt(mt, i, 1 + i % 3) for i in range(4)]
    for tasks in (["qa"] * 4, ["sum"] * 4, [None] * 4, ["qa", "sum", "emb", None], ["qa"] * 4):
        got = answers(engine, prompts, tasks)  # merged qa, a switch to sum, the base, a mixed step, qa again
        assert got == [alone(mt, p, t) for p, t in zip(prompts, tasks)], tasks
    assert engine.stats()["prepacked_steps_total"] >= 5 * (GREEDY.max_tokens - 1)
    off = Engine(mt, max_num_seqs=4, prepack_weights=False)
    answers(off, prompts, ["qa"] * 4)
    assert off.stats()["prepacked_steps_total"] == 0


def test_packed_weights_follow_a_task_registered_again(mt, tiny_llama, tmp_path):  # noqa: F811
    engine = Engine(mt, max_num_seqs=2)
    prompts = [prompt(mt, 1), prompt(mt, 2)]
    mt.add_downstream("again", make_adapter(tiny_llama, tmp_path / "a", "all-linear", seed=5))
    try:
        first = answers(engine, prompts, ["again"] * 2)
        assert first == [alone(mt, p, "again") for p in prompts]
        engine.call(lambda: mt.add_downstream("again", make_adapter(tiny_llama, tmp_path / "b", "all-linear", seed=6)))
        second = answers(engine, prompts, ["again"] * 2)
        assert second == [alone(mt, p, "again") for p in prompts] and second != first
    finally:
        mt.remove_downstream("again")


def test_packed_weights_follow_merged_weights_rebuilt_in_the_same_buffers(tiny_llama, tmp_path):
    # merged_cache_bytes=0 keeps only the active task's merged weights: each switch rebuilds the next task's in
    # the same buffers, so a packed copy keyed by the weight's storage alone would be stale
    same = {name: make_adapter(tiny_llama, tmp_path / name, "all-linear", seed) for seed, name in enumerate("ab")}
    tasks = lora.MultiTaskModel(tiny_llama, same, merged_cache_bytes=0)
    engine = Engine(tasks, max_num_seqs=2, merge_after=1)
    prompts = [prompt(tasks, 1), prompt(tasks, 2)]
    got = {}
    for task in ("a", "b", "a"):
        got[task] = answers(engine, prompts, [task] * 2)
        assert got[task] == [alone(tasks, p, task) for p in prompts], task
    assert got["a"] != got["b"]


def test_single_stream_split_across_threads_answers_as_linear_across_switches(mt):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs one thread per worker, which has nothing to split
    try:
        on, off = Engine(mt, max_num_seqs=1, merge_after=1), Engine(mt, max_num_seqs=1, prepack_weights=False)
        for task in ("qa", "sum", None, "qa"):  # merged qa, a switch to sum, the base, qa again
            assert answers(on, [prompt(mt, 3)], [task]) == answers(off, [prompt(mt, 3)], [task]), task
        assert on.stats()["split_row_steps_total"] >= 4 * (GREEDY.max_tokens - 1)
        assert off.stats()["split_row_steps_total"] == 0
    finally:
        torch.set_num_threads(threads)
