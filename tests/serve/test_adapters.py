"""Adapters loaded and unloaded at run time: only from inside --adapter-root, checked as they are opened."""
import os
import shutil
import time

import openai
import pytest

from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.conftest import make_adapter
from tests.serve.helpers import QUESTIONS, error_of, get, metrics, openai_client, post, raw_prompt, serving


def test_load_and_unload_an_adapter_at_run_time(server, client, reference):
    url = server[0]
    assert post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"}).status_code == 200
    assert "extra" in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(model="extra", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=10)
    assert out.choices[0].message.content == reference.generate_response("extra", QUESTIONS[0], max_new_tokens=10)

    again = post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    assert "extra" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="hi", max_tokens=2)
    gone = post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"


def test_the_adapter_checked_is_the_one_served(server, client, adapters, reference):
    """Loading reads and checks the checkpoint once, off the engine thread, and registers what it checked:
    weights swapped on disk after the load do not reach the answers."""
    url, adapter_root = server[0], adapters[1]
    shutil.copytree(adapter_root / "extra", adapter_root / "checked")
    assert post(url + "/v1/load_lora_adapter", json={"lora_name": "checked", "lora_path": "checked"}).status_code == 200
    shutil.copy(adapters[0]["color"] / "adapter_model.safetensors", adapter_root / "checked")
    try:
        out = client.chat.completions.create(model="checked", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                             max_tokens=10)
        assert out.choices[0].message.content == reference.generate_response("extra", QUESTIONS[0], max_new_tokens=10)
    finally:
        post(url + "/v1/unload_lora_adapter", json={"lora_name": "checked"})
        shutil.rmtree(adapter_root / "checked")


def test_adapters_load_only_from_inside_the_adapter_root(server, adapters):
    url = server[0]
    paths, adapter_root = adapters

    def load(path):
        return post(url + "/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": str(path)})
    for path in (paths["color"], "../run-color/final", "extra/../../run-color/final", "escape", "/etc"):
        refused = load(path)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "path_not_allowed"
    for path in ("empty", "missing", "extra/adapter_config.json"):
        bad = load(path)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_adapter", path
    assert "sneaky" not in [m["id"] for m in get(url + "/v1/models").json()["data"]]


def test_adapter_files_are_checked_as_they_are_opened(server):
    """A FIFO config, weights linked out of the root and corrupt weights: quick 4xx naming the file, and
    the server keeps serving."""
    url = server[0]

    def load(path):
        return post(url + "/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path}, timeout=30)
    start = time.monotonic()
    fifo = load("fifo")
    assert time.monotonic() - start < 10
    assert fifo.status_code == 400 and fifo.json()["error"]["code"] == "invalid_adapter"
    assert "fifo/adapter_config.json" in fifo.json()["error"]["message"] and "FIFO" in fifo.json()["error"]["message"]
    linked = load("linked")
    assert linked.status_code == 403 and "adapter_model.safetensors" in linked.json()["error"]["message"]
    malformed = load("malformed")
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "lora_path"
    assert "malformed/adapter_model.safetensors" in malformed.json()["error"]["message"]
    assert get(url + "/health", timeout=5).status_code == 200
    assert "sneaky" not in [m["id"] for m in get(url + "/v1/models").json()["data"]]


def test_a_reread_after_eviction_checks_the_root_again(tiny_llama, adapters, tmp_path):
    """An adapter swapped for a link out of the root after it was loaded is refused when it is read again."""
    paths, adapter_root = adapters
    root = tmp_path / "root"
    for name in ("swap", "other"):
        shutil.copytree(adapter_root / "extra", root / name)
    mt = MultiTaskModel(tiny_llama, cache_bytes=1, merged_cache_bytes=0)  # every switch re-reads from disk
    with serving(create_app(mt, served_model_name="tiny", adapter_root=str(root))) as url:
        client = openai_client(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for name in ("swap", "other"):
            assert post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).is_success
        os.rename(root / "swap", tmp_path / "swap-old")
        os.symlink(paths["color"], root / "swap")
        client.completions.create(model="other", prompt="hi", max_tokens=2)  # "swap" leaves the cache
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="swap", prompt=raw_prompt(QUESTIONS[0]), max_tokens=8)
        assert "symbolic link" in error_of(e)["message"]
        assert client.completions.create(model="other", prompt="hi", max_tokens=2).choices  # and it still serves


def test_lora_names_are_limited_and_unloaded_tasks_leave_the_metrics(server, client):
    url = server[0]
    for name in ("x" * 129, "", "a b", "tiny", "ü"):
        refused = post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "extra"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_name", name
        assert len(refused.text) < 500
    assert post(url + "/v1/load_lora_adapter", json={"lora_name": "org/extra:v1.2_x-y",
                                                           "lora_path": "extra"}).status_code == 200
    client.completions.create(model="org/extra:v1.2_x-y", prompt="hi", max_tokens=2)
    labelled = [key for key in metrics(url) if ("task", "org/extra:v1.2_x-y") in key[1]]
    assert any(name == "lora:request_success_total" for name, _ in labelled)
    assert post(url + "/v1/unload_lora_adapter", json={"lora_name": "org/extra:v1.2_x-y"}).status_code == 200
    assert not [key for key in metrics(url) if ("task", "org/extra:v1.2_x-y") in key[1]]


def test_errors_name_files_relative_to_the_adapter_root_and_the_model_by_its_name(server, adapters, chat_llama,
                                                                                 other_llama, tmp_path):
    url, adapter_root = server[0], adapters[1]
    foreign = make_adapter(other_llama, adapter_root / "foreign", ["q_proj"], 0)  # trained on another base
    try:
        for path in ("foreign", "empty", "fifo", "malformed", "linked", "/etc", "../x"):
            answer = post(url + "/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": path}, timeout=30)
            message = answer.json()["error"]["message"]
            assert answer.status_code in (400, 403) and str(adapter_root) not in message, message
            assert os.path.realpath(adapter_root) not in message and str(tmp_path.parent) not in message
            assert chat_llama not in message and other_llama not in message
        mismatch = post(url + "/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "foreign"}).json()
        assert "tiny" in mismatch["error"]["message"]  # the served model, by its served name
    finally:
        shutil.rmtree(foreign)
