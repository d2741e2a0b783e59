"""What one request may ask for, and the clear 4xx it gets beyond that."""
import concurrent.futures
import contextlib
import gc
import json
import socket
import threading
import time
import tracemalloc

import openai
import pytest

from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.serve.helpers import CAP, MAX_PROMPTS, GatedEngine, error_of, get, post, serving


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

    malformed = post(url + "/v1/chat/completions", content=b'{"model": "color", "messages": [',
                     headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    huge = post(url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    unknown = get(url + "/v1/nothing-here")
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}


def test_chunked_body_over_the_limit_gets_413_as_it_arrives(server):
    """No Content-Length to trust: the bytes are counted as they come, and the rest is never read."""
    def body():
        yield b'{"model": "color", "prompt": "'
        for _ in range(3 * 16):  # 3 MiB in 64 KiB chunks, sent with Transfer-Encoding: chunked
            yield b"x" * (64 << 10)
        yield b'"}'
    refused = post(server[0] + "/v1/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=30)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
    assert refused.headers["connection"] == "close"  # the unread rest cannot be parsed as a next request


def test_huge_prompt_is_refused_while_health_stays_fast(server):
    """Prompts near the body limit are refused before they are tokenized (seconds of CPU each), and
    /health does not wait for them meanwhile."""
    url, answers = server[0], []

    def send():
        for _ in range(3):
            answers.append(post(url + "/v1/completions", timeout=120, json={
                "model": "color", "prompt": "apple river stone cloud, " * 40000, "max_tokens": 2}))
    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    while sender.is_alive() or not latencies:
        start = time.monotonic()
        assert get(url + "/health", timeout=120).status_code == 200
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


@pytest.mark.parametrize("field,value", [
    ("best_of", 3), ("logit_bias", {"50": 100}), ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("suffix", "!"), ("prompt_logprobs", 2)])
def test_openai_fields_not_implemented_are_refused_by_name(server, field, value):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        answer = post(server[0] + path, json={"model": "color", "max_tokens": 2, **body, field: value})
        assert answer.status_code == 400, (path, field)
        error = answer.json()["error"]
        assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_field"


def test_harmless_and_neutral_fields_are_accepted(client):
    out = client.completions.create(model="color", prompt="hi", max_tokens=2, user="someone", best_of=1, echo=False,
                                    presence_penalty=0, frequency_penalty=0.0, logprobs=None,
                                    extra_body={"repetition_penalty": 1.0, "metadata": {"a": "b"}})
    assert out.choices[0].finish_reason


def test_sampling_values_are_checked_by_the_engine_s_one_validator(client):
    for fields in ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, {"temperature": -1}, {"top_p": 0},
                   {"max_tokens": 0}, {"extra_body": {"top_k": -3}}, {"stop": ["x"] * 100}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="color", prompt="hi", **{"max_tokens": 4, **fields})
        assert error_of(e)["code"] == "invalid_sampling_params", fields
    assert client.completions.create(model="color", prompt="hi", max_tokens=2, extra_body={"top_k": -1}).choices
    with pytest.raises(openai.BadRequestError) as e:  # the default budget (16) is under min_tokens too
        client.completions.create(model="color", prompt="hi", extra_body={"min_tokens": 20})
    assert "min_tokens" in error_of(e)["message"]


def test_lone_surrogates_are_a_400_not_a_500(server):
    for path, body in (("/v1/completions", '{"model": "color", "prompt": "a\\ud800"}'),
                       ("/v1/completions", '{"model": "\\udfff", "prompt": "a"}'),
                       ("/v1/chat/completions", '{"model": "color", "messages": [{"role": "user", "content": "\\ud800"}]}'),
                       ("/v1/generate", '{"downstream": "color", "instruction": "x\\ud800y"}')):
        answer = post(server[0] + path, content=body.encode(), headers={"content-type": "application/json"})
        assert answer.status_code == 400, (path, body)
        assert "surrogate" in answer.json()["error"]["message"]


def test_chat_turns_are_limited_and_tokenizing_is_linear(server):
    """A chat of 3,201 empty turns is refused at once; the longest allowed one does not hold up another client."""
    url = server[0]
    turns = [{"role": role, "content": ""} for _ in range(1600) for role in ("user", "assistant")]
    start = time.monotonic()
    refused = post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "color-chat", "messages": turns + [{"role": "user", "content": ""}]})
    assert time.monotonic() - start < 2
    assert refused.status_code == 400 and "--max-chat-turns" in refused.json()["error"]["message"]
    allowed = turns[:254] + [{"role": "user", "content": "hi"}]  # 255 messages: within the default 256

    def long_chat():
        return post(url + "/v1/chat/completions", timeout=60,
                    json={"model": "color-chat", "messages": allowed, "max_tokens": 2})
    short = {"model": "color-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(long_chat) for _ in range(3)]
        time.sleep(0.05)
        start = time.monotonic()
        assert post(url + "/v1/chat/completions", json=short, timeout=60).status_code == 200
        waited = time.monotonic() - start
        assert all(f.result().status_code in (200, 400) for f in longs)
    assert waited < 1.0


def test_a_stalled_body_gets_408_and_tiny_chunks_cost_little(tiny_llama):
    mt = MultiTaskModel(tiny_llama)
    with serving(create_app(mt, served_model_name="tiny", body_timeout=0.3)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"model\"")
            stalled.settimeout(10)
            start = time.monotonic()
            answer = stalled.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
            answer += b"".join(iter(lambda: stalled.recv(4096), b""))  # until the server closes it
            assert b"--body-timeout" in answer and b"connection: close" in answer.lower()  # closed at once
        # 1 MB in 1-byte chunks: /health keeps answering meanwhile.
        chunked = b"".join(b"1\r\n" + b"x" + b"\r\n" for _ in range(1 << 20)) + b"0\r\n\r\n"
        latencies = []
        with socket.create_connection(("127.0.0.1", port)) as tiny:
            tiny.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            def send():
                with contextlib.suppress(OSError):  # the server may answer and close before the end
                    tiny.sendall(chunked)
            sender = threading.Thread(target=send)
            sender.start()
            while sender.is_alive():
                start = time.monotonic()
                assert get(url + "/health", timeout=30).status_code == 200
                latencies.append(time.monotonic() - start)
            sender.join()
        assert max(latencies) < 1.0


def test_a_waiting_request_holds_its_token_ids_not_its_body(tiny_llama):
    """Bodies padded with a megabyte of a field the server ignores: while they wait, memory stays flat."""
    mt = MultiTaskModel(tiny_llama)
    engine = GatedEngine(mt)
    with serving(create_app(mt, engine, served_model_name="tiny")) as url:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "u" * ((1 << 20) - 100)}).encode()
        post(url + "/v1/completions", content=body, timeout=30)  # warm: pools, tokenizer copies
        engine.paused.clear()
        tracemalloc.start()  # Python's own count of live allocations, in the server's threads and the clients'
        before = tracemalloc.get_traced_memory()[0]
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = [pool.submit(post, url + "/v1/completions", content=body, timeout=60) for _ in range(30)]
            deadline = time.monotonic() + 60
            while engine.stats()["waiting"] < 30:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            engine.paused.set()
            assert all(a.result().status_code == 200 for a in answers)
    assert grown < 20 << 20, f"30 waiting requests grew memory by {grown >> 20} MiB"

