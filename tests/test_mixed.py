"""Mixed-task batches: unmerged per-token adapters answer exactly as merged ones."""
import pytest
import torch

import lora
from lora.errors import LoraError
from lora.multitask import MultiTaskModel
from tests.conftest import make_adapter


@pytest.fixture(scope="module")
def llama_tasks(tmp_path_factory, tiny_llama):
    """Three random adapters on the tiny Llama; `embed` also adapts the (untied) token embedding."""
    root = tmp_path_factory.mktemp("mixed-llama")
    targets = {"color": ["q_proj", "v_proj"], "reverse": ["q_proj", "v_proj"],
               "embed": ["embed_tokens", "q_proj", "k_proj", "o_proj"]}
    return tiny_llama, {name: make_adapter(tiny_llama, root / name, t, seed)
                        for seed, (name, t) in enumerate(targets.items())}


@pytest.fixture(scope="module")
def gpt2_tasks(tmp_path_factory, tiny_gpt2):
    """Two random adapters on the tiny GPT-2, whose Conv1D weights are stored transposed."""
    root = tmp_path_factory.mktemp("mixed-gpt2")
    return tiny_gpt2, {name: make_adapter(tiny_gpt2, root / name, ["c_attn"], seed)
                       for seed, name in enumerate(("color", "reverse"))}


def mixed_rows(mt, row_tasks, ids):
    """Logits of one forward over the base weights where row i gets the update of row_tasks[i] (None: none)."""
    tasks = sorted({t for t in row_tasks if t is not None})
    mixed = mt.mix(tasks)
    mixed.select(torch.tensor([[0 if t is None else tasks.index(t) + 1] for t in row_tasks]))
    with torch.no_grad(), mt.apply_downstream(None) as model, mixed.attached():
        return model(ids).logits


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
    ids = mt.tokenizer([prompt["prompt"]] * 3, return_tensors="pt")["input_ids"]
    rows = mixed_rows(mt, ["color", None, "embed"], ids)
    with torch.no_grad():
        for i, task in enumerate(["color", None, "embed"]):  # each row got exactly its own task
            with mt.apply_downstream(task) as hf_model:
                torch.testing.assert_close(rows[i], hf_model(ids[i:i + 1]).logits[0], atol=1e-5, rtol=1e-5)
    assert mt.active == (("reverse", 1.0),)
    assert not any(m._forward_hooks for m in mt.pretrained_model.modules())
    assert mt.generate_responses([{**prompt, "downstream": "reverse"}]) == before


def test_blends_run_merged_beside_mixed_batches(llama_tasks):
    model, paths = llama_tasks
    mt = MultiTaskModel(model, paths)
    blend = {"color": 0.5, "reverse": 0.5}
    requests = requests_for(["color", blend, "reverse"])
    mixed = mt.generate_responses(requests, mode="mixed")
    assert mixed == mt.generate_responses(requests, mode="merged")
    assert mixed[1] == mt.generate_responses([requests[1]])[0]


def test_unknown_mode_is_refused(llama_tasks):
    model, paths = llama_tasks
    mt = MultiTaskModel(model, paths)
    with pytest.raises(LoraError, match="unknown batching mode 'fast'"):
        mt.generate_responses(requests_for(["color"]), mode="fast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_update_is_rounded_once(tmp_path, tiny_llama, dtype):
    """A mixed row's output is the exact base output + low-rank update, rounded once to the model's dtype.

    Rounding the update (or its factors) to bfloat16/float16 before adding it, as a plain unmerged LoRA layer
    does, makes tokens drift from merged weights more than the one rounding they cannot avoid.
    """
    path = make_adapter(tiny_llama, tmp_path / "adapter", ["q_proj"], seed=0)
    name, adapter = next(iter(lora.read_adapter(path).modules.items()))
    torch.manual_seed(0)
    x = torch.randn(4, 16, adapter.A.shape[1]).to(dtype)
    outputs = {}
    for update_dtype in (torch.float32, dtype):  # the default, and the update computed in the model's dtype
        mt = MultiTaskModel(tiny_llama, {"task": path}, dtype=dtype, update_dtype=update_dtype)
        module = mt.pretrained_model.get_submodule(name)
        mixed = mt.mix(["task"])
        mixed.select(torch.ones(4, 16, dtype=torch.long))  # every token uses tasks[0]
        mt.activate(None)
        with torch.no_grad():
            base = module(x)
            with mixed.attached():
                outputs[update_dtype] = module(x)
    update = (x.double() @ adapter.A.double().T @ adapter.B.double().T) * adapter.scaling
    exact = (base.double() + update).to(dtype)
    assert (outputs[torch.float32] != exact).float().mean() < 0.01
    assert (outputs[dtype] != exact).float().mean() > 0.1  # the test can tell the two apart
    assert (base + update.to(dtype) != exact).float().mean() > 0.1


def test_each_token_gets_its_own_tasks_update_however_the_step_groups_them(tmp_path, tiny_llama):
    """Decode-like steps (a token or a few per task, a few rows of neighbouring tasks and the base), a prompt chunk
    beside single tokens, tasks in slots far apart, ranks that differ and an adapted embedding: every token gets
    exactly its own task's update."""
    paths = {f"t{i}": make_adapter(tiny_llama, tmp_path / f"t{i}", ["embed_tokens", "q_proj"] if i % 2 else ["q_proj"],
                                   seed=i, r=2 + 2 * (i % 3)) for i in range(6)}
    adapters = {name: lora.read_adapter(path) for name, path in paths.items()}
    mt = MultiTaskModel(tiny_llama, paths)
    mt.activate(None)
    names = sorted(paths)
    assert mt.mix(names, max_loras=6).tasks == tuple(names)  # every slot taken, in order
    generator = torch.Generator().manual_seed(0)
    steps = {"balanced": [t for t in [*names, None] for _ in range(4)],
             "chunk beside single tokens": ["t2"] * 40 + names + [None] * 3,
             "slots far apart": ["t5", "t0", None, "t5", "t0", "t0"],
             "a few rows of neighbouring tasks and the base": ["t1", None, "t2", "t1", "t3"],
             "one task": ["t3"] * 9}
    for step, row_tasks in steps.items():
        order = torch.randperm(len(row_tasks), generator=generator).tolist()
        row_tasks = [row_tasks[i] for i in order]
        tasks = sorted({t for t in row_tasks if t})
        mixed = mt.mix(tasks)
        mixed.select(torch.tensor([[0 if t is None else tasks.index(t) + 1 for t in row_tasks]]))
        for module_name in adapters["t1"].modules:
            module = mt.pretrained_model.get_submodule(module_name)
            embedding = isinstance(module, torch.nn.Embedding)
            x = torch.randint(0, module.num_embeddings, (1, len(row_tasks)), generator=generator) if embedding else \
                torch.randn(1, len(row_tasks), module.in_features, generator=generator)
            with torch.no_grad():
                expected = module(x)
                for i, task in enumerate(row_tasks):
                    m = adapters[task].modules.get(module_name) if task else None
                    if m is not None:
                        expected[0, i] += lora.layers.lora_update(x[0, i:i + 1], m.A, m.B, m.scaling, embedding)[0]
                with mixed.attached():
                    got = module(x)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{step}: {module_name}")


def test_a_new_task_takes_the_least_recently_used_slot_and_older_mixes_stay_exact(tmp_path, tiny_llama):
    """Two slots, three tasks: a third task evicts the least recently used one; a mix made before still gives
    each token its own task's update (it takes its task's slot back), and a re-registered task its new weights."""
    paths = {name: make_adapter(tiny_llama, tmp_path / name, ["q_proj"], seed=i) for i, name in enumerate("abc")}
    adapters = {name: lora.read_adapter(path) for name, path in paths.items()}
    mt = MultiTaskModel(tiny_llama, paths)
    mt.activate(None)
    module_name = next(iter(adapters["a"].modules))
    module = mt.pretrained_model.get_submodule(module_name)
    x = torch.randn(1, 4, module.in_features, generator=torch.Generator().manual_seed(0))

    def check(mixed, row_tasks):
        mixed.select(torch.tensor([[mixed.tasks.index(t) + 1 for t in row_tasks]]))
        with torch.no_grad():
            expected = module(x)
            for i, task in enumerate(row_tasks):
                m = adapters[task].modules[module_name]
                expected[0, i] += lora.layers.lora_update(x[0, i:i + 1], m.A, m.B, m.scaling)[0]
            with mixed.attached():
                torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)

    first = mt.mix(["a", "b"], max_loras=2)
    check(first, ["a", "b", "b", "a"])
    check(mt.mix(["c"]), ["c"] * 4)  # takes a's slot, the least recently used
    check(first, ["b", "a", "a", "b"])  # a comes back (into c's slot)
    mt.add_downstream("b", paths["c"])  # b now means other weights
    adapters["b"] = adapters["c"]
    check(first, ["b", "a", "b", "a"])
