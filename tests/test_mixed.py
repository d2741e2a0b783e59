"""Mixed-task batches: unmerged per-row adapters answer exactly as merged ones, and the batching policy."""
import math

import pytest

from tests.conftest import finetune_argv, write_task
from lora.cli import main
from lora.errors import LoraError
from lora.multitask import MultiTaskModel, plan_batches

TRAIN = ("--learning_rate", "1e-2", "--lora_alpha", "32")


@pytest.fixture(scope="module")
def llama_tasks(tmp_path_factory, tiny_llama):
    """Three adapters on the tiny Llama; `embed` also adapts the (untied) token embedding."""
    root = tmp_path_factory.mktemp("mixed-llama")
    specs = {"color": ("color", "q_proj\nv_proj\n", 0), "reverse": ("reverse", "q_proj\nv_proj\n", 0),
             "embed": ("color", "embed_tokens\nq_proj\nk_proj\no_proj\n", 1)}
    paths = {}
    for name, (task, targets, seed) in specs.items():
        folder = write_task(root / f"task-{name}", task, targets=targets, seed=seed)
        assert main(["finetune", *finetune_argv(tiny_llama, folder, root / name, "--seed", seed, *TRAIN)]) == 0
        paths[name] = root / name / "final"
    return tiny_llama, paths


@pytest.fixture(scope="module")
def gpt2_tasks(tmp_path_factory, tiny_gpt2):
    """Two adapters on the tiny GPT-2, whose Conv1D weights are stored transposed."""
    root = tmp_path_factory.mktemp("mixed-gpt2")
    paths = {}
    for name in ("color", "reverse"):
        folder = write_task(root / f"task-{name}", name, targets="c_attn\n")
        assert main(["finetune", *finetune_argv(tiny_gpt2, folder, root / name, *TRAIN)]) == 0
        paths[name] = root / name / "final"
    return tiny_gpt2, paths


def requests_for(tasks):
    things = ["apple", "river", "stone", "violin", "garden"]
    return [{"downstream": tasks[i % len(tasks)], "instruction": f"What colour is the {thing}?",
             "input": thing if i % 2 else "", "max_new_tokens": 10}
            for i, thing in enumerate(things * 2)]


@pytest.mark.parametrize("fixture", ["llama_tasks", "gpt2_tasks"])
def test_mixed_batches_answer_exactly_as_merged_and_single_requests(request, fixture):
    model, paths = request.getfixturevalue(fixture)
    mt = MultiTaskModel(model, paths)
    requests = requests_for([*paths, None])
    mixed = mt.generate_responses(requests, batch_size=8, mode="mixed")
    merged = mt.generate_responses(requests, batch_size=8, mode="merged")
    auto = mt.generate_responses(requests, batch_size=8, mode="auto")
    single = [mt.generate_response(r["downstream"], r["instruction"], r["input"], max_new_tokens=10) for r in requests]
    assert mixed == merged == auto == single
    # The adapters matter: the same prompt gets a different answer under each task and the base.
    by_task = {r["downstream"]: a for r, a in zip(requests, single) if r["instruction"].endswith("apple?")}
    assert len(set(by_task.values())) == len(by_task) > 1


def test_mixed_batch_leaves_the_model_as_it_was(llama_tasks):
    model, paths = llama_tasks
    mt = MultiTaskModel(model, paths)
    prompt = {"prompt": "### Instruction:\nWhat colour is the lamp?\n### Response:\n", "max_new_tokens": 8}
    before = mt.generate_responses([{**prompt, "downstream": "reverse"}])
    mt.generate_responses([{**prompt, "downstream": t} for t in ("color", "embed", None)], mode="mixed")
    mt.activate("reverse")
    with mt.mixed_batch(["color", None, "embed"]):
        mt.generate_batch([prompt["prompt"]] * 3, max_new_tokens=4)
    assert mt.active == (("reverse", 1.0),)
    assert not any(m._forward_hooks for m in mt.pretrained_model.modules())
    assert mt.generate_responses([{**prompt, "downstream": "reverse"}]) == before


def test_blends_run_merged_beside_mixed_batches(llama_tasks):
    model, paths = llama_tasks
    mt = MultiTaskModel(model, paths)
    blend = {"color": 0.5, "reverse": 0.5}
    requests = requests_for(["color", blend, "reverse"])
    assert mt.generate_responses(requests, mode="mixed") == mt.generate_responses(requests, mode="merged")
    with mt.apply_downstream(blend):
        alone = mt.generate_batch([mt.prompt_for(requests[1])], max_new_tokens=10)
    assert mt.generate_responses(requests, mode="mixed")[1] == alone[0]


def test_auto_merges_a_task_that_fills_batches_and_mixes_the_rest():
    queue = ["a"] * 37 + ["b", "c", "d", "a", "e"]
    plan = plan_batches(queue, 16, "auto")
    merged = [b for mixed, b in plan if not mixed]
    assert [len(b) for b in merged] == [16, 16] and all(queue[i] == "a" for b in merged for i in b)
    assert sum(mixed for mixed, _ in plan) == 1  # the six other "a"s and the small tasks share one batch
    assert len(plan) == math.ceil(len(queue) / 16)  # never more batches than mixed-only
    assert sorted(i for _, b in plan for i in b) == list(range(len(queue)))


def test_auto_mixes_a_spread_queue_and_merges_a_single_task():
    spread = [f"t{i % 8}" for i in range(40)]
    assert [(mixed, len(b)) for mixed, b in plan_batches(spread, 16, "auto")] == [(True, 16), (True, 16), (True, 8)]
    assert plan_batches(["a"] * 5, 16, "auto") == [(False, [0, 1, 2, 3, 4])]
    assert plan_batches(["a"] * 5, 16, "mixed") == [(True, [0, 1, 2, 3, 4])]


def test_merged_and_unmixable_tasks_get_batches_of_their_own():
    queue = ["a", "b", "a", "blend", "b", "a"]
    assert plan_batches(queue, 2, "merged") == [(False, [0, 2]), (False, [5]), (False, [1, 4]), (False, [3])]
    plan = plan_batches(queue, 16, "mixed", can_mix=lambda task: task != "blend")
    assert plan == [(False, [3]), (True, [0, 2, 5, 1, 4])]


def test_unknown_mode_is_refused(llama_tasks):
    model, paths = llama_tasks
    mt = MultiTaskModel(model, paths)
    with pytest.raises(LoraError, match="unknown batching mode 'fast'"):
        mt.generate_responses(requests_for(["color"]), mode="fast")
