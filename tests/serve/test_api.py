"""`lora serve` answers as the library does: models, completions, chat, sampling, streaming, metrics."""
import concurrent.futures
import threading
import time

import pytest

from lora.chat import render_chat
from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.serve.helpers import (
    CHAT_SYSTEM,
    QUESTIONS,
    TASKS,
    GatedEngine,
    get,
    metrics,
    openai_client,
    post,
    raw_prompt,
    serving,
)


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
    out = post(url + "/v1/generate", json=body, timeout=60).json()
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


def test_metrics_in_prometheus_format(server, client):
    url = server[0]
    before = metrics(url)
    client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                   max_tokens=8, extra_body={"ignore_eos": True})
    after = metrics(url)
    assert get(url + "/metrics").headers["content-type"].startswith("text/plain")
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
    # the same chat again: its prompt (but the last partial block) comes from the prefix cache
    client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                   max_tokens=1)
    again = metrics(url)
    for prefix in ("lora", "vllm"):
        queried = again[(f"{prefix}:prefix_cache_queries_total", ())] - after[(f"{prefix}:prefix_cache_queries_total", ())]
        hit = again[(f"{prefix}:prefix_cache_hits_total", ())] - after[(f"{prefix}:prefix_cache_hits_total", ())]
        assert hit > 0 and 0 < queried - hit <= 16  # blocks of 16 tokens; the last prompt token always runs
    assert 0 < again[("lora:prefix_cache_hit_rate", ())] <= 1 and 0 < again[("lora:prefix_cache_usage_perc", ())] <= 1


@pytest.mark.long
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
            time.sleep(0.1)  # each look costs the server a /metrics page: a few looks see the requests together
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


def test_vllm_metric_names_for_routers(tiny_llama, adapters):
    """The names Kubernetes inference gateways read, with the adapters running and waiting."""
    mt = MultiTaskModel(tiny_llama, {"color": adapters[0]["color"], "reverse": adapters[0]["reverse"]})
    engine = GatedEngine(mt, max_num_seqs=1)
    with serving(create_app(mt, engine, served_model_name="tiny")) as url:
        client = openai_client(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        idle = metrics(url)
        assert idle[("vllm:num_requests_running", ())] == idle[("vllm:num_requests_waiting", ())] == 0
        assert idle[("vllm:kv_cache_usage_perc", ())] == 0
        (info,) = [labels for name, labels in idle if name == "vllm:lora_requests_info"]
        assert dict(info) == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.completions.create, model="color", prompt="hi", max_tokens=200,
                                extra_body={"ignore_eos": True})
            deadline = time.monotonic() + 30
            while engine.stats()["running"] < 1:  # color runs: now hold the engine
                assert time.monotonic() < deadline
                time.sleep(0.001)
            engine.paused.clear()
            second = pool.submit(client.completions.create, model="reverse", prompt="hi", max_tokens=2)
            while engine.stats()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = metrics(url)
            engine.paused.set()
            first.result(), second.result()
    assert busy[("vllm:num_requests_running", ())] == 1 and busy[("vllm:num_requests_waiting", ())] == 1
    assert 0 < busy[("vllm:kv_cache_usage_perc", ())] <= 1
    (info,) = [labels for name, labels in busy if name == "vllm:lora_requests_info"]
    assert dict(info) == {"running_lora_adapters": "color", "waiting_lora_adapters": "reverse", "max_lora": "1"}
