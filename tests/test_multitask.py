"""MultiTaskModel: exact and safe swapping among many tasks, lazy loading, batched generation."""
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from lora.registry import ByteLRU
from tests.conftest import THINGS, make_adapter

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
    real_addmm, calls = torch.addmm, {"n": 0}

    def addmm_then_interrupt(*args, **kwargs):  # each merged weight is one addmm
        calls["n"] += 1
        out = real_addmm(*args, **kwargs)
        if calls["n"] == 5:  # half-way through building the weights for "sum"
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(torch, "addmm", addmm_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        mt.activate("sum")
    monkeypatch.undo()
    assert mt.active == (("qa", 1.0),) and same(weights(mt.pretrained_model), on_qa)
    assert mt.normalize("sum") not in mt.cache_info().merged  # the half-built weights are not kept
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
    monkeypatch.undo()
    question = {"downstream": "tag", "instruction": "What colour is the lamp?", "max_new_tokens": 6}
    assert mt.generate_responses([question]) == multitask(tiny_llama, adapters).generate_responses([question])


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


def test_threads_share_a_started_engine_and_get_what_each_request_gets_alone(tiny_llama, adapters):
    """With an engine thread, concurrent calls from many threads run in one batch (several tasks per step),
    and each still gets exactly its answer alone; a task replaced meanwhile answers with its new weights."""
    mt = multitask(tiny_llama, adapters)
    reqs = requests(16)
    expected = [mt.generate_response(**r) for r in reqs]
    engine = mt.start(batch_size=8)
    try:
        got = [None] * len(reqs)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, mt.generate_response(**reqs[i])))
                   for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == expected
        stats = engine.stats()
        assert stats["steps_total"] < stats["generation_tokens_total"]  # requests shared steps
        mt.add_downstream("qa", adapters["sum"])  # the name now means other weights
        as_sum = mt.generate_response(**{**reqs[1], "downstream": "sum"})
        assert mt.generate_response(**{**reqs[1], "downstream": "qa"}) == as_sum != expected[1]
    finally:
        mt.shutdown()


def test_recent_tasks_keep_merged_weights_within_budget(tiny_llama, adapters, monkeypatch):
    merges = []
    monkeypatch.setattr(torch, "addmm", lambda *a, real=torch.addmm, **k: merges.append(1) or real(*a, **k))
    one_task = multitask(tiny_llama, adapters)
    one_task.activate("sum")  # all-linear: the largest merged weights of the three
    budget = one_task.cache_info().merged_bytes
    recent = [(("tag", 1.0),), (("qa", 1.0),), (("sum", 1.0),)]
    for merged_cache_bytes, rebuilt, kept in [(3 * budget, 3, recent), (budget, 5, recent[-1:])]:
        mt = multitask(tiny_llama, adapters, merged_cache_bytes=merged_cache_bytes)
        built = []
        for task in ["qa", "sum", "tag", None, "qa", "sum"]:
            before = len(merges)
            mt.activate(task)
            built.append(len(merges) > before)
            assert mt.cache_info().merged_bytes <= merged_cache_bytes
        assert sum(built) == rebuilt  # with room for all three, going back to a task rebuilds nothing
        assert mt.cache_info().merged == kept
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
    assert len(mt.downstreams) == 1000 and mt.cache_info().device == []  # registering reads no adapter
    for task in ["task1", "task998", "task1", "task998"]:
        mt.activate(task)
    assert mt.cache_info().device == ["task1", "task998"]
    reference = multitask(tiny_llama, adapters)
    reference.activate("qa")
    mt.activate("task1")
    assert same(weights(mt.pretrained_model), weights(reference.pretrained_model))


def test_cache_is_bounded_in_bytes_and_evicts_least_recent(tiny_llama, adapters):
    one = lora.read_adapter(adapters["sum"]).nbytes
    mt = multitask(tiny_llama, adapters, cache_bytes=one + 1, merged_cache_bytes=0)  # every switch reads
    for task in ["qa", "sum", "tag", "qa"]:
        mt.activate(task)
        info = mt.cache_info()  # over budget only by the task that was active while this one was read
        assert info.device[-1] == task and (info.device_bytes <= one + 1 or len(info.device) == 2)
    assert mt.cache_info().device_bytes == sum(lora.read_adapter(adapters[t]).nbytes for t in mt.cache_info().device)
    reference = multitask(tiny_llama, adapters)
    for task in adapters:
        mt.activate(task)
        reference.activate(task)
        assert same(weights(mt.pretrained_model), weights(reference.pretrained_model))


def test_byte_lru_keeps_a_running_total_and_spares_what_it_must_keep():
    lru = ByteLRU(10, size=len)
    for key, value in [("a", "xxx"), ("b", "xxxx"), ("c", "xxx")]:
        lru.put(key, value)
    assert lru.nbytes == 10 and lru.evict() == []
    lru.get("a")  # now the most recently used
    lru.put("d", "xx")
    assert lru.evict(keep={"b"}) == [("c", "xxx")] and list(lru) == ["b", "a", "d"] and lru.nbytes == 9
    assert lru.evict(need=6) == [("b", "xxxx"), ("a", "xxx")] and lru.nbytes == 2
    lru.put("d", "x")  # replacing a value counts its new size
    assert lru.nbytes == 1 and lru.pop("d") == "x" and lru.nbytes == 0 and len(lru) == 0


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


def with_scale(source, folder, alpha, factor):
    """A copy of an adapter with lora_alpha set to `alpha` and A and B multiplied by `factor`."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def test_updates_that_overflow_float32_are_refused_naming_file_and_field(tiny_llama, adapters, tmp_path):
    # alpha / r = 1e39 is beyond float32, though with A and B of 1e-30 every product the file implies is tiny.
    huge = with_scale(adapters["qa"], tmp_path / "huge", 4e39, 1e-30)
    mt = multitask(tiny_llama, {**adapters, "huge": huge})
    mt.activate("qa")
    on_qa = weights(mt.pretrained_model)
    config = str(huge / "adapter_config.json")
    for use in (mt.adapter, mt.activate, lambda task: mt.mix([task]),
                lambda task: mt.generate_responses([{"downstream": task, "instruction": "hi"}], mode="mixed")):
        with pytest.raises(lora.LoraError, match=f"{config}: lora_alpha .* scale .*of 1e\\+39"):
            use("huge")
        assert mt.active == (("qa", 1.0),) and same(weights(mt.pretrained_model), on_qa)
    for blend, message in [({"qa": 1e39, "tag": 1.0}, "weights {qa: 1e\\+39, tag: 1} make the update of .* overflow"),
                           ({"qa": float("inf")}, "weight of task 'qa' must be a finite number, got inf"),
                           ({"qa": "much"}, "weight of task 'qa' must be a finite number, got 'much'")]:
        with pytest.raises(lora.LoraError, match=message):
            mt.activate(blend)
        assert mt.active == (("qa", 1.0),) and same(weights(mt.pretrained_model), on_qa)
    assert generate_all(mt)  # the other tasks still answer


def test_mixed_updates_are_checked_in_the_dtype_they_are_computed_in(tiny_llama, adapters, tmp_path):
    big = with_scale(adapters["qa"], tmp_path / "big", 8, 300.0)  # |update| up to ~1e5: float32 only
    mt = multitask(tiny_llama, {"big": big}, update_dtype=torch.float16)
    with pytest.raises(lora.LoraError, match="weights {big: 1} make the update of .* overflow float16"):
        mt.mix(["big"])
    mt.activate("big")  # merged weights are float32 here: fine
    assert multitask(tiny_llama, {"big": big}).mix(["big"]).tasks == ("big",)


def generate_all(mt):
    return mt.generate_responses(requests(8), batch_size=4)


def test_one_engine_serves_every_call_and_sees_replaced_tasks(tiny_llama, adapters):
    mt = multitask(tiny_llama, adapters)
    first = generate_all(mt)
    assert generate_all(mt) == first and mt.generate_responses(requests(8), batch_size=4, mode="mixed") == first
    as_tag = [{**r, "downstream": "tag"} for r in requests(8)]
    tag_answers = mt.generate_responses(as_tag, batch_size=4, mode="mixed")
    assert tag_answers != first
    mt.add_downstream("qa", adapters["tag"])  # the same name, another adapter: answers follow the new one
    replaced = mt.generate_responses(requests(8), batch_size=4, mode="mixed")
    assert [a for r, a in zip(requests(8), replaced) if r["downstream"] == "qa"] == \
           [a for r, a in zip(requests(8), tag_answers) if r["downstream"] == "qa"]
