"""`lora serve`: the real server on 127.0.0.1, driven with the official `openai` client."""
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from lora.chat import render_chat
from lora.cli import main
from lora.engine import Engine
from lora.multitask import MultiTaskModel
from lora.serve import DrainingServer, create_app
from tests.conftest import CHAT_TEMPLATE, finetune_argv, write_task

TASKS = {"color": ("color", 0), "reverse": ("reverse", 0), "color2": ("color", 1), "reverse2": ("reverse", 1)}
QUESTIONS = [f"What colour is the {thing}?" for thing in ("apple", "river", "stone", "violin", "garden")]
CAP = 64  # --max-tokens-cap of the test server
MAX_PROMPTS = 16  # --max-prompts of the test server: the engine's default max_num_seqs


def train(model, root, name, task, seed):
    folder = write_task(root / f"data-{name}", task, seed=seed)
    argv = finetune_argv(model, folder, root / f"run-{name}", "--seed", seed, "--learning_rate", "1e-2",
                         "--lora_alpha", "32")
    assert main(["finetune", *argv]) == 0
    return root / f"run-{name}" / "final"


CHAT_SYSTEM = "You name colours."


def chat_adapter(source, folder):
    """A copy of an adapter whose lora_task.json says it was trained on chat data with a system prompt."""
    shutil.copytree(source, folder)
    meta = json.loads((folder / "lora_task.json").read_text())
    meta.pop("prompt_format", None)
    meta.update(data_format="messages", chat_template=True, system_prompt=CHAT_SYSTEM)
    (folder / "lora_task.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    """Four Alpaca task adapters and a chat one, plus an adapter root holding one more (`extra`), an empty
    folder, a symlink that leads out of the root, and checkpoints an attacker would write."""
    root = tmp_path_factory.mktemp("serve")
    paths = {name: train(tiny_llama, root, name, task, seed) for name, (task, seed) in TASKS.items()}
    paths["color-chat"] = chat_adapter(paths["color"], root / "color-chat")
    adapter_root = root / "adapter-root"
    adapter_root.mkdir()
    shutil.copytree(train(tiny_llama, root, "extra", "reverse", 2), adapter_root / "extra")
    (adapter_root / "empty").mkdir()
    os.symlink(paths["color"], adapter_root / "escape")
    fifo = adapter_root / "fifo"  # a named pipe as its config: reading it would wait forever for a writer
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")
    linked = adapter_root / "linked"  # in the root, but its weights are a link to a file outside it
    linked.mkdir()
    shutil.copy(paths["color"] / "adapter_config.json", linked)
    os.symlink(paths["color"] / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    malformed = shutil.copytree(adapter_root / "extra", adapter_root / "malformed")
    (malformed / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return paths, adapter_root


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tiny_llama):
    """tiny_llama with a chat template, as an -Instruct model ships: the chat task needs one."""
    folder = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn in a thread, on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def server(chat_llama, adapters):
    paths, adapter_root = adapters
    mt = MultiTaskModel(chat_llama, paths)
    app = create_app(mt, served_model_name="tiny", adapter_root=str(adapter_root), max_tokens_cap=CAP)
    with serving(app) as url:
        yield url, mt


@pytest.fixture(scope="module")
def reference(chat_llama, adapters):
    """The library's own answers, one request at a time, from a model the server does not share."""
    mt = MultiTaskModel(chat_llama, adapters[0])
    mt.add_downstream("extra", adapters[1] / "extra")
    return mt


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw_prompt(question):
    return f"### Instruction:\n{question}\n### Input:\n\n### Response:\n"


def test_models_lists_the_base_model_and_every_task(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "color", "color-chat", "color2", "reverse", "reverse2"]
    assert all(m.owned_by == "lora-pytorch" for m in models)
    assert client.models.retrieve("reverse").id == "reverse"


def test_completions_apply_each_task_adapter(client, reference):
    prompt = raw_prompt(QUESTIONS[0])
    answers = {}
    for task in [*TASKS, "tiny"]:
        out = client.completions.create(model=task, prompt=prompt, max_tokens=10)
        answers[task] = out.choices[0].text
        expected = reference.generate_responses([{"downstream": None if task == "tiny" else task, "prompt": prompt,
                                                 "max_new_tokens": 10}])[0]
        assert answers[task].strip() == expected
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 10
    assert len(set(answers.values())) > 2  # the adapters do change the answers


def test_completions_take_a_list_of_prompts(client, reference):
    prompts = [raw_prompt(q) for q in QUESTIONS[:3]]
    out = client.completions.create(model="reverse", prompt=prompts, max_tokens=8)
    assert [c.index for c in out.choices] == [0, 1, 2]
    expected = reference.generate_responses([{"downstream": "reverse", "prompt": p, "max_new_tokens": 8} for p in prompts])
    assert [c.text.strip() for c in out.choices] == expected


def test_chat_fills_the_task_prompt_with_the_last_user_message(client, reference):
    for task in TASKS:
        out = client.chat.completions.create(
            model=task, max_tokens=10,
            messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "an earlier turn"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": QUESTIONS[1]}])
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == reference.generate_response(task, QUESTIONS[1], max_new_tokens=10)


def test_chat_task_gets_the_whole_conversation_in_its_chat_template(client, reference):
    """A task trained on chat data sees what training showed it: every turn, its system prompt, the template."""
    messages = [{"role": "user", "content": "an earlier turn"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": QUESTIONS[1]}]
    out = client.chat.completions.create(model="color-chat", messages=messages, max_tokens=10)
    expected = reference.generate_responses([{"downstream": "color-chat", "messages": messages, "max_new_tokens": 10}])
    assert out.choices[0].message.content == expected[0]
    assert out.usage.prompt_tokens == len(render_chat(reference.tokenizer, messages, CHAT_SYSTEM))
    assert out.usage.prompt_tokens > len(render_chat(reference.tokenizer, messages))  # the system prompt was added


def test_sampling_fields_reach_the_engine(client):
    prompt = raw_prompt(QUESTIONS[3])

    def complete(**fields):
        return client.completions.create(model="color2", prompt=prompt, **{"max_tokens": 12, **fields})
    greedy = complete().choices[0].text
    sampled = [complete(temperature=1.5, seed=seed).choices[0].text for seed in (7, 7, 8, 9, 10)]
    assert sampled[0] == sampled[1] and len(set(sampled)) > 1  # a seed reproduces its sample; seeds differ
    assert complete(temperature=1.5, extra_body={"top_k": 1}).choices[0].text == greedy
    long = complete(max_tokens=20, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"
    at_least = complete(max_tokens=9, extra_body={"min_tokens": 9})
    assert at_least.usage.completion_tokens == 9
    several = complete(n=3, temperature=1.5, seed=1)
    assert [c.index for c in several.choices] == [0, 1, 2] and several.usage.completion_tokens > 0
    assert [c.text for c in several.choices] == [c.text for c in complete(n=3, temperature=1.5, seed=1).choices]


def test_empty_prompt_gets_a_normal_answer(client):
    alone = client.completions.create(model="color", prompt="", max_tokens=4)
    assert alone.choices[0].finish_reason in ("stop", "length")
    batched = client.completions.create(model="color", prompt=["", raw_prompt(QUESTIONS[0])], max_tokens=4)
    assert batched.choices[0].text == alone.choices[0].text and len(batched.choices) == 2


def test_native_generate_answers_as_generate_response(server, reference):
    url = server[0]
    body = {"downstream": "reverse2", "instruction": "Spell the word backwards.", "input": "piano", "max_new_tokens": 12}
    out = httpx.post(url + "/v1/generate", json=body, timeout=60).json()
    assert out["response"] == reference.generate_response("reverse2", "Spell the word backwards.", "piano",
                                                          max_new_tokens=12)
    assert out["downstream"] == "reverse2" and out["usage"]["completion_tokens"] <= 12


def test_streamed_answers_add_up_to_the_whole_answer(client):
    prompt = raw_prompt(QUESTIONS[2])
    whole = client.completions.create(model="color", prompt=prompt, max_tokens=12)
    chunks = list(client.completions.create(model="color", prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": QUESTIONS[3]}]
    whole = client.chat.completions.create(model="reverse", messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model="reverse", messages=messages, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_end_the_answer_streamed_or_not(client):
    prompt = raw_prompt(QUESTIONS[4])
    full = client.completions.create(model="reverse2", prompt=prompt, max_tokens=16).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]
    out = client.completions.create(model="reverse2", prompt=prompt, max_tokens=16, stop=[stop, "\x00never"])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="reverse2", prompt=prompt, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_load_and_unload_an_adapter_at_run_time(server, client, reference):
    url = server[0]
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"}).status_code == 200
    assert "extra" in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(model="extra", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=10)
    assert out.choices[0].message.content == reference.generate_response("extra", QUESTIONS[0], max_new_tokens=10)

    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    assert "extra" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="hi", max_tokens=2)
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"


def test_adapters_load_only_from_inside_the_adapter_root(server, adapters):
    url = server[0]
    paths, adapter_root = adapters

    def load(path):
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": str(path)})
    for path in (paths["color"], "../run-color/final", "extra/../../run-color/final", "escape", "/etc"):
        refused = load(path)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "path_not_allowed"
    for path in ("empty", "missing", "extra/adapter_config.json"):
        bad = load(path)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_adapter", path
    assert "sneaky" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def test_adapter_files_are_checked_as_they_are_opened(server):
    """A FIFO config, weights linked out of the root and corrupt weights: quick 4xx naming the file, and
    the server keeps serving."""
    url = server[0]

    def load(path):
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path}, timeout=30)
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
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert "sneaky" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def test_a_reread_after_eviction_checks_the_root_again(tiny_llama, adapters, tmp_path):
    """An adapter swapped for a link out of the root after it was loaded is refused when it is read again."""
    paths, adapter_root = adapters
    root = tmp_path / "root"
    for name in ("swap", "other"):
        shutil.copytree(adapter_root / "extra", root / name)
    mt = MultiTaskModel(tiny_llama, cache_bytes=1, merged_cache_bytes=0)  # every switch re-reads from disk
    with serving(create_app(mt, served_model_name="tiny", adapter_root=str(root))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for name in ("swap", "other"):
            assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).is_success
        os.rename(root / "swap", tmp_path / "swap-old")
        os.symlink(paths["color"], root / "swap")
        client.completions.create(model="other", prompt="hi", max_tokens=2)  # "swap" leaves the cache
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="swap", prompt=raw_prompt(QUESTIONS[0]), max_tokens=8)
        assert "symbolic link" in error_of(e)["message"]
        assert client.completions.create(model="other", prompt="hi", max_tokens=2).choices  # and it still serves


def error_of(excinfo):
    """The OpenAI error object of a failed call, checked for OpenAI's shape."""
    body = excinfo.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_come_in_openai_shape_with_the_right_status(server, client):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-task", prompt="hi", max_tokens=2)
    assert error_of(e)["code"] == "model_not_found" and error_of(e)["param"] == "model"

    long_prompt = "apple river stone cloud " * 100
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="color", prompt=long_prompt, max_tokens=2)
    assert error_of(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="color", messages=[{"role": "user", "content": long_prompt}])
    assert error_of(e)["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="color", prompt="hi", max_tokens=CAP + 1)
    assert error_of(e)["param"] == "max_tokens" and error_of(e)["code"] == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="color", prompt="hi", max_tokens=2, n=MAX_PROMPTS + 1)
    assert error_of(e)["param"] == "n" and error_of(e)["code"] == "too_many_prompts"

    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="color", prompt="hi", max_tokens="5")
    assert error_of(e)["param"] == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="color", messages=[{"role": "user", "content": 7}])
    assert error_of(e)["param"] == "messages.0.content"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="color", messages=[], temperature="hot")
    assert error_of(e)["param"] in ("messages", "temperature")

    malformed = httpx.post(url + "/v1/chat/completions", content=b'{"model": "color", "messages": [',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.get(url + "/v1/nothing-here")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}


def test_chunked_body_over_the_limit_gets_413_as_it_arrives(server):
    """No Content-Length to trust: the bytes are counted as they come, and the rest is never read."""
    def body():
        yield b'{"model": "color", "prompt": "'
        for _ in range(3 * 16):  # 3 MiB in 64 KiB chunks, sent with Transfer-Encoding: chunked
            yield b"x" * (64 << 10)
        yield b'"}'
    refused = httpx.post(server[0] + "/v1/completions", content=body(), headers={"content-type": "application/json"},
                         timeout=30)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"


def test_huge_prompt_is_refused_while_health_stays_fast(server):
    """Prompts near the body limit are refused before they are tokenized (seconds of CPU each), and
    /health does not wait for them meanwhile."""
    url, answers = server[0], []

    def send():
        for _ in range(3):
            answers.append(httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "color", "prompt": "apple river stone cloud, " * 40000, "max_tokens": 2}))
    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    while sender.is_alive() or not latencies:
        start = time.monotonic()
        assert httpx.get(url + "/health", timeout=120).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.01)
    sender.join()
    assert [a.json()["error"]["code"] for a in answers] == ["context_length_exceeded"] * 3
    assert max(latencies) < 3.0  # tokenizing these prompts on the event loop would stall it for 4+ s each


def test_prompts_times_n_are_bounded_per_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="color", prompt=["hi"] * (MAX_PROMPTS + 1), max_tokens=2)
    assert error_of(e)["param"] == "prompt" and error_of(e)["code"] == "too_many_prompts"
    assert f"limit of {MAX_PROMPTS} (--max-prompts)" in error_of(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="color", prompt=["hi"] * 4, max_tokens=2, n=MAX_PROMPTS // 4 + 1)
    assert error_of(e)["param"] == "n"
    assert len(client.completions.create(model="color", prompt=["hi"] * 4, n=MAX_PROMPTS // 4, max_tokens=2).choices) \
        == MAX_PROMPTS


def test_metrics_in_prometheus_format(server, client):
    url = server[0]
    before = metrics(url)
    client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                   max_tokens=8, extra_body={"ignore_eos": True})
    after = metrics(url)
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")
    for name in ("lora:num_requests_running", "lora:num_requests_waiting", "lora:kv_cache_usage_perc"):
        assert (name, ()) in after
    assert after[("lora:prompt_tokens_total", ())] > before[("lora:prompt_tokens_total", ())]
    assert after[("lora:generation_tokens_total", ())] - before[("lora:generation_tokens_total", ())] >= 8

    def count(values, name, **labels):
        return values.get((name, tuple(sorted(labels.items()))), 0)
    assert count(after, "lora:time_to_first_token_seconds_count", task="reverse") \
        == count(before, "lora:time_to_first_token_seconds_count", task="reverse") + 1
    gaps = count(after, "lora:inter_token_latency_seconds_count", task="reverse") \
        - count(before, "lora:inter_token_latency_seconds_count", task="reverse")
    assert 0 < gaps <= 7  # one per token after the first (tokens that show no text yet arrive with the next)
    assert count(after, "lora:request_success_total", task="reverse", finished_reason="length") \
        == count(before, "lora:request_success_total", task="reverse", finished_reason="length") + 1


def test_a_full_queue_gets_429_with_retry_after(tiny_llama):
    mt = MultiTaskModel(tiny_llama)
    with serving(create_app(mt, Engine(mt, max_waiting=0), served_model_name="tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert error_of(e)["code"] == "queue_full" and int(e.value.response.headers["retry-after"]) >= 1
        assert httpx.get(url + "/health").status_code == 200


def test_api_key_guards_every_endpoint_but_health(tiny_llama, adapters):
    app = create_app(MultiTaskModel(tiny_llama, {"color": adapters[0]["color"]}), served_model_name="tiny", api_key="sekret")
    with serving(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/color"),
                             ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/generate"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                answer = httpx.request(method, url + path, json={}, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "color"]
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert client.completions.create(model="color", prompt="hi", max_tokens=3).choices[0].finish_reason
        # Without --adapter-root, loading at run time is off.
        refused = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"},
                             headers={"Authorization": "Bearer sekret"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "adapter_loading_disabled"


def metrics(url):
    """/metrics parsed: {(sample name, sorted labels): value}."""
    text = httpx.get(url + "/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_load_200_requests_from_16_clients_over_4_tasks(server, client, reference):
    """Concurrent clients share the engine's steps, tasks mixed, and each answer is the one it gets alone."""
    url = server[0]
    expected = {(task, q): reference.generate_response(task, q, max_new_tokens=6) for task in TASKS for q in QUESTIONS}
    jobs = [(list(TASKS)[i % 4], QUESTIONS[(i // 4) % len(QUESTIONS)], i % 3) for i in range(200)]
    before = metrics(url)

    def ask(job):
        task, question, kind = job
        if kind == 0:
            out = client.completions.create(model=task, prompt=raw_prompt(question), max_tokens=6)
            return out.choices[0].text.strip()
        if kind == 1:
            out = client.chat.completions.create(model=task, messages=[{"role": "user", "content": question}], max_tokens=6)
            return out.choices[0].message.content
        chunks = client.chat.completions.create(model=task, messages=[{"role": "user", "content": question}],
                                                max_tokens=6, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    running, done = [], threading.Event()

    def watch():
        while not done.is_set():
            running.append(metrics(url)[("lora:num_requests_running", ())])
            time.sleep(0.01)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, jobs))
    finally:
        done.set()
        watcher.join()
    assert answers == [expected[task, question] for task, question, _ in jobs]
    assert max(running) > 1  # requests did run together
    after = metrics(url)
    for task in TASKS:
        key = ("lora:request_success_total", (("finished_reason", "length"), ("task", task)))
        stopped = ("lora:request_success_total", (("finished_reason", "stop"), ("task", task)))
        assert after.get(key, 0) + after.get(stopped, 0) - before.get(key, 0) - before.get(stopped, 0) == 50
    assert after[("lora:generation_tokens_total", ())] > before[("lora:generation_tokens_total", ())]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_with_health_503_then_exits(tmp_path, tiny_llama, adapters):
    """`lora serve` as a user starts it (the key from LORA_API_KEY): after SIGTERM the socket stays open,
    /health and new requests get 503, the requests in flight finish, then the process exits."""
    paths = adapters[0]
    mapper = tmp_path / "tasks.json"
    mapper.write_text(json.dumps({"color": str(paths["color"]), "reverse": str(paths["reverse"])}))
    port = free_port()
    env = {**os.environ, "LORA_API_KEY": "k3y", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lora.cli", "serve", "--model", tiny_llama, "--mapper", str(mapper),
                             "--port", str(port), "--max-num-seqs", "1", "--max-tokens-cap", "200", "--device", "cpu",
                             "--enforce-eager"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "lora serve did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=120)
        # The base model's id is the model folder's name (vLLM's default), never the server's local path.
        name = os.path.basename(tiny_llama)
        assert [m.id for m in client.models.list().data] == [name, "color", "reverse"]
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        assert name in error_of(e)["message"] and tiny_llama not in error_of(e)["message"]

        prompts = [raw_prompt(q) for q in QUESTIONS[:4]]
        long = {"max_tokens": 60, "extra_body": {"ignore_eos": True}}
        expected = [client.completions.create(model="color", prompt=p, **long).choices[0].text for p in prompts]

        def stream(prompt):
            return client.completions.create(model="color", prompt=prompt, stream=True, **long)
        # One runs at a time (--max-num-seqs 1), so when SIGTERM comes some are still waiting in the queue.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(stream, prompts))
            first = next(iter(streams[0]))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while (status := httpx.get(url + "/health").status_code) != 503:  # a refused connection fails here
                assert status == 200 and time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="color", prompt="hi", max_tokens=2)
            assert e.value.status_code == 503 and error_of(e)["code"] == "shutting_down"
            assert httpx.get(url + "/health").status_code == 503
            texts = list(pool.map(lambda s: "".join(c.choices[0].text for c in s), streams))
        texts[0] = first.choices[0].text + texts[0]
        assert texts == expected
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
