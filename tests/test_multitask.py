"""MultiTaskModel: exact and safe swapping among many tasks, lazy loading, batched generation."""
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from tests.conftest import PROMPT, THINGS, make_adapter

TARGETS = {"qa": ["q_proj", "v_proj"], "sum": "all-linear", "tag": ["o_proj", "up_proj"]}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_llama, root / name, targets, seed)
            for seed, (name, targets) in enumerate(TARGETS.items())}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def multitask(tiny_llama, adapters, dtype=None, **kwargs):
    model, tok = lora.load_model(tiny_llama, dtype=dtype)
    return lora.MultiTaskModel(model, adapters, tokenizer=tok, **kwargs)


@pytest.mark.parametrize("merged_cache_bytes", [0, 1 << 30])  # 0: every switch rebuilds, in reused buffers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thousand_switches_restore_base_bitwise(tiny_llama, adapters, dtype, merged_cache_bytes):
    mt = multitask(tiny_llama, adapters, dtype=dtype, merged_cache_bytes=merged_cache_bytes)
    base = weights(mt.pretrained_model)
    applied = {}
    for task in adapters:
        mt.activate(task)
        applied[task] = weights(mt.pretrained_model)
        assert not same(applied[task], base)
    cycle = ["qa", "sum", None, "tag", {"qa": 0.5, "sum": 0.5}, "qa", "tag", "sum"]
    for i in range(1000):
        mt.activate(cycle[i % len(cycle)])
        if i % 97 == 0 and isinstance(cycle[i % len(cycle)], str):
            assert same(weights(mt.pretrained_model), applied[cycle[i % len(cycle)]])
    for task in adapters:
        mt.activate(task)
        assert same(weights(mt.pretrained_model), applied[task])  # the same weights every time
    mt.activate(None)
    assert same(weights(mt.pretrained_model), base)


def test_merged_task_matches_unmerged_lora_and_weighted_sum(tiny_llama, adapters):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    expected = {}
    for task, path in adapters.items():
        model = lora.load_model(tiny_llama)[0]
        lora.load_adapter(model, path)
        expected[task] = model(ids).logits
    mt = multitask(tiny_llama, adapters)
    base_logits = mt.pretrained_model(ids).logits
    for task in adapters:
        with mt.apply_downstream(task) as model:
            assert (model(ids).logits - expected[task]).abs().max() < 1e-4
    assert mt.active is None and torch.equal(mt.pretrained_model(ids).logits, base_logits)
    # A weighted combination adds weighted deltas, like PEFT's add_weighted_adapter (linear).
    mt.activate({"qa": 0.7, "tag": 0.3})
    w = mt.pretrained_model.model.layers[0].self_attn.q_proj.weight
    mt.activate(None)
    w0 = w.detach().clone()
    qa = lora.read_adapter(adapters["qa"]).modules["model.layers.0.self_attn.q_proj"]
    mt.activate({"qa": 0.7, "tag": 0.3})
    assert torch.allclose(w, w0 + 0.7 * qa.scaling * qa.B @ qa.A, atol=1e-6)


@pytest.mark.parametrize("merged_cache_bytes", [1 << 30, 0])  # 0: the previous task's buffers are being reused
def test_interrupted_switch_leaves_previous_task_exactly(tiny_llama, adapters, monkeypatch, merged_cache_bytes):
    mt = multitask(tiny_llama, adapters, merged_cache_bytes=merged_cache_bytes)
    mt.activate("qa")
    on_qa = weights(mt.pretrained_model)
    real_merge, calls = mt._merge, {"n": 0}

    def merge_then_interrupt(out, base, step):
        calls["n"] += 1
        real_merge(out, base, step)
        if calls["n"] == 5:  # half-way through building the weights for "sum"
            raise KeyboardInterrupt
    monkeypatch.setattr(mt, "_merge", merge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        mt.activate("sum")
    monkeypatch.undo()
    assert mt.active == (("qa", 1.0),) and same(weights(mt.pretrained_model), on_qa)
    mt.activate("sum")
    mt.activate("qa")
    assert same(weights(mt.pretrained_model), on_qa)


def test_exception_inside_apply_downstream_or_generation_restores(tiny_llama, adapters, monkeypatch):
    mt = multitask(tiny_llama, adapters)
    base = weights(mt.pretrained_model)
    with pytest.raises(RuntimeError):
        with mt.apply_downstream("sum"):
            raise RuntimeError("user code failed")
    assert mt.active is None and same(weights(mt.pretrained_model), base)

    def broken_forward(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(mt.pretrained_model, "forward", broken_forward)
    with pytest.raises(KeyboardInterrupt):
        mt.generate_response("tag", "What colour is the lamp?")
    mt.activate(None)  # the model was left on a complete task ("tag"); going back is exact
    assert same(weights(mt.pretrained_model), base)


def requests(n=12):
    tasks = [None, "qa", "sum", "tag"]
    return [{"downstream": tasks[i % 4], "instruction": f"What colour is the {THINGS[i % len(THINGS)]}?",
             "input": "", "max_new_tokens": 6} for i in range(n)]


def test_generate_responses_equal_single_calls_in_request_order(tiny_llama, adapters):
    mt = multitask(tiny_llama, adapters)
    reqs = requests()
    single = [mt.generate_response(**r) for r in reqs]
    assert len(set(single)) > 4  # tasks really answer differently
    assert mt.generate_responses(reqs, batch_size=5) == single


def test_threads_get_the_outputs_of_sequential_calls(tiny_llama, adapters):
    mt = multitask(tiny_llama, adapters)
    reqs = requests(16)
    expected = [mt.generate_response(**r) for r in reqs]
    got = [None] * len(reqs)

    def worker(i):
        got[i] = mt.generate_response(**reqs[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_recent_tasks_keep_merged_weights_within_budget(tiny_llama, adapters, monkeypatch):
    merges = []
    one_task = multitask(tiny_llama, adapters)
    one_task.activate("sum")  # all-linear: the largest merged weights of the three
    budget = sum(t.nbytes for t in one_task._merged[one_task._active_key].values())
    for merged_cache_bytes, rebuilt in [(3 * budget, 3), (budget, 5)]:
        mt = multitask(tiny_llama, adapters, merged_cache_bytes=merged_cache_bytes)
        monkeypatch.setattr(mt, "_merge", lambda out, base, step, real=mt._merge: merges.append(1) or real(out, base, step))
        built = []
        for task in ["qa", "sum", "tag", None, "qa", "sum"]:
            before = len(merges)
            mt.activate(task)
            built.append(len(merges) > before)
        assert sum(built) == rebuilt  # with room for all three, going back to a task rebuilds nothing
        assert sum(t.nbytes for m in mt._merged.values() for t in m.values()) <= merged_cache_bytes
        mt.activate("sum")
        assert same(weights(mt.pretrained_model), weights(one_task.pretrained_model))


def test_thousand_registered_adapters_load_lazily(tiny_llama, adapters, tmp_path):
    mapper = {}
    for i in range(1000):
        folder = tmp_path / f"task{i}"
        shutil.copytree(adapters["qa" if i % 2 else "tag"], folder)
        mapper[f"task{i}"] = str(folder)
    (tmp_path / "mapper.json").write_text(json.dumps({k: os.path.basename(v) for k, v in mapper.items()}))
    mt = multitask(tiny_llama, tmp_path / "mapper.json")
    assert len(mt.downstreams) == 1000 and len(mt._cache) == 0  # registering reads no adapter
    for task in ["task1", "task998", "task1", "task998"]:
        mt.activate(task)
    assert set(mt._cache) == {"task1", "task998"}
    reference = multitask(tiny_llama, adapters)
    reference.activate("qa")
    mt.activate("task1")
    assert same(weights(mt.pretrained_model), weights(reference.pretrained_model))


def test_cache_is_bounded_in_bytes_and_evicts_least_recent(tiny_llama, adapters):
    one = lora.read_adapter(adapters["sum"]).nbytes
    mt = multitask(tiny_llama, adapters, cache_bytes=one + 1, merged_cache_bytes=0)  # every switch reads
    for task in ["qa", "sum", "tag", "qa"]:
        mt.activate(task)
    assert sum(a.nbytes for a in mt._cache.values()) <= one + 1 or len(mt._cache) == 1
    assert list(mt._cache)[-1] == "qa"
    reference = multitask(tiny_llama, adapters)
    for task in adapters:
        mt.activate(task)
        reference.activate(task)
        assert same(weights(mt.pretrained_model), weights(reference.pretrained_model))


def test_mapper_forms_and_runtime_registry(tiny_llama, adapters, tmp_path):
    folder = tmp_path / "tasks"
    for name, path in adapters.items():
        shutil.copytree(path, folder / name)
    assert multitask(tiny_llama, folder).downstreams == sorted(adapters)
    mt = multitask(tiny_llama, {"qa": adapters["qa"]})
    mt.add_downstream("sum", adapters["sum"])
    mt.activate("sum")
    mt.remove_downstream("sum")
    assert mt.downstreams == ["qa"] and mt.active is None
    with pytest.raises(lora.LoraError, match="unknown downstream task 'sum'; registered tasks: qa"):
        mt.generate_response("sum", "hi")


def test_bad_checkpoints_are_rejected_before_any_weight_changes(tiny_llama, other_llama, tiny_gpt2, adapters, tmp_path):
    foreign = make_adapter(other_llama, tmp_path / "foreign", ["q_proj"], 0)
    gpt2 = make_adapter(tiny_gpt2, tmp_path / "gpt2", ["c_attn"], 0)
    nan = shutil.copytree(adapters["qa"], tmp_path / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in tensors.items()}, nan / "adapter_model.safetensors")
    truncated = shutil.copytree(adapters["qa"], tmp_path / "truncated")
    with open(truncated / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)
    empty = tmp_path / "empty"
    empty.mkdir()
    mt = multitask(tiny_llama, {**adapters, "foreign": foreign, "gpt2": gpt2, "nan": nan, "truncated": truncated,
                                "empty": empty})
    mt.activate("qa")
    on_qa = weights(mt.pretrained_model)
    for task, message in [("foreign", "trained on base model .*other-llama.* not on the loaded .*tiny-llama"),
                          ("gpt2", "has no module"), ("nan", "NaN or Inf"), ("truncated", "corrupt or truncated"),
                          ("empty", "adapter_config.json .*missing"), ("nope", "registered tasks: qa, sum, tag")]:
        with pytest.raises(lora.LoraError, match=message):
            mt.activate(task)
        assert mt.active == (("qa", 1.0),) and same(weights(mt.pretrained_model), on_qa)
    with pytest.raises(lora.LoraError, match="not found"):
        mt.add_downstream("ghost", tmp_path / "ghost")
