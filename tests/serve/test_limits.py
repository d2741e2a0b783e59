"""What one request may ask for, and the clear 4xx it gets beyond that."""
import threading
import time

import httpx
import openai
import pytest

from tests.serve.helpers import CAP, MAX_PROMPTS, error_of


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
