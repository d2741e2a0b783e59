"""The server's life: auth, a full queue, SIGTERM's bounded drain, a stopped engine."""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from lora.engine import Engine
from lora.errors import LoraError
from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.serve.helpers import (
    QUESTIONS,
    GatedEngine,
    error_of,
    free_port,
    get,
    openai_client,
    post,
    raw_prompt,
    request,
    serving,
)


def test_a_full_queue_gets_429_with_retry_after(tiny_llama):
    mt = MultiTaskModel(tiny_llama)
    with serving(create_app(mt, Engine(mt, max_waiting=0), served_model_name="tiny")) as url:
        client = openai_client(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert error_of(e)["code"] == "queue_full" and int(e.value.response.headers["retry-after"]) >= 1
        assert get(url + "/health").status_code == 200


def test_api_key_guards_every_endpoint_but_health(tiny_llama, adapters):
    app = create_app(MultiTaskModel(tiny_llama, {"color": adapters[0]["color"]}), served_model_name="tiny", api_key="sekret")
    with serving(app) as url:
        assert get(url + "/health").status_code == 200
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/color"),
                             ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/generate"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                answer = request(method, url + path, json={}, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai_client(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai_client(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "color"]
        assert get(url + "/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert client.completions.create(model="color", prompt="hi", max_tokens=3).choices[0].finish_reason
        # Without --adapter-root, loading at run time is off.
        refused = post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"},
                       headers={"Authorization": "Bearer sekret"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "adapter_loading_disabled"


@pytest.mark.long
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
                             "--shutdown-timeout", "2", "--body-timeout", "600", "--enforce-eager"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "lora serve did not start"
            with contextlib.suppress(httpx.TransportError):
                if get(url + "/health").status_code == 200:
                    break
            time.sleep(0.05)
        assert get(url + "/v1/models").status_code == 401
        client = openai_client(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=120)
        # The base model's id is the model folder's name (vLLM's default), never the server's local path.
        name = os.path.basename(tiny_llama)
        assert [m.id for m in client.models.list().data] == [name, "color", "reverse"]
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        assert name in error_of(e)["message"] and tiny_llama not in error_of(e)["message"]

        prompts = [raw_prompt(q) for q in QUESTIONS[:4]]
        long = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}
        expected = [client.completions.create(model="color", prompt=p, **long).choices[0].text for p in prompts]

        def stream(prompt):
            return client.completions.create(model="color", prompt=prompt, stream=True, **long)
        # One runs at a time (--max-num-seqs 1), so when SIGTERM comes some are still waiting in the queue.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(stream, prompts))
            first = next(iter(streams[0]))
            # A client that sends half a body and stalls: only the drain deadline ends it.
            stalled = socket.create_connection(("127.0.0.1", port))
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            time.sleep(1)  # it is in flight before the signal
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = time.monotonic() + 30
            while (status := get(url + "/health").status_code) != 503:  # a refused connection fails here
                assert status == 200 and time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="color", prompt="hi", max_tokens=2)
            assert e.value.status_code == 503 and error_of(e)["code"] == "shutting_down"
            assert get(url + "/health").status_code == 503
            texts = list(pool.map(lambda s: "".join(c.choices[0].text for c in s), streams))
        texts[0] = first.choices[0].text + texts[0]
        assert texts == expected
        assert proc.wait(timeout=60) == 0
        assert 1.5 < time.monotonic() - signalled < 30  # --shutdown-timeout (2 s) ended it, not --body-timeout
        stalled.settimeout(5)
        assert stalled.recv(100) == b""  # its connection was closed
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


class Fatal(BaseException):
    """A fault no step survives: the engine thread stops."""


def test_a_stopped_engine_fails_every_request_at_once_with_503(tiny_llama):
    mt = MultiTaskModel(tiny_llama)
    engine = GatedEngine(mt)
    with serving(create_app(mt, engine, served_model_name="tiny")) as url:
        client = openai_client(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        engine.paused.clear()  # what comes now waits
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(client.completions.create, model="tiny", prompt="hi", max_tokens=2)
            streamed = pool.submit(lambda: post(url + "/v1/completions", timeout=30, json={
                "model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}).text)
            deadline = time.monotonic() + 30
            while engine.stats()["waiting"] + engine.stats()["running"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            engine.kill = Fatal("injected fault")
            engine.paused.set()
            with pytest.raises(openai.APIStatusError) as e:
                waiting.result(timeout=30)
            assert e.value.status_code == 503 and error_of(e)["code"] == "engine_dead"
            events = streamed.result(timeout=30)
        assert '"code": "engine_dead"' in events and events.endswith("data: [DONE]\n\n")
        assert get(url + "/health").status_code == 503
        start = time.monotonic()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=stream)
            assert e.value.status_code == 503 and "injected fault" in error_of(e)["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503
        unload = post(url + "/v1/unload_lora_adapter", json={"lora_name": "x"})
        assert unload.status_code == 503 and unload.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - start < 5


def test_startup_refuses_settings_that_cannot_work(tiny_llama, adapters, capsys):
    from lora.cli import main
    assert main(["serve", "--model", tiny_llama, "--max-waiting", "0"]) == 2
    assert "--max-waiting must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", tiny_llama, "--block-size", "0"]) == 2
    assert "--block-size must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", tiny_llama, "--prefix-cache-bytes", "1000"]) == 2
    assert "holds no block of 16 tokens" in capsys.readouterr().err
    # A task named like the served base model would be listed twice and answered by the base.
    mt = MultiTaskModel(tiny_llama, {"tiny": adapters[0]["color"]})
    with pytest.raises(LoraError, match="task 'tiny' has the served model's name"):
        create_app(mt, served_model_name="tiny")
    assert main(["serve", "--model", tiny_llama, "--mapper", str(adapters[0]["color"].parent / "m.json"),
                 "--served-model-name", "x", "--shutdown-timeout", "0"]) == 2
    assert "--shutdown-timeout must be a positive number" in capsys.readouterr().err


def test_a_non_ascii_api_key_works(tiny_llama):
    mt = MultiTaskModel(tiny_llama)
    with serving(create_app(mt, served_model_name="tiny", api_key="clé-ключ")) as url:
        right = get(url + "/v1/models", headers={"Authorization": "Bearer clé-ключ".encode()})
        assert right.status_code == 200 and right.json()["data"][0]["id"] == "tiny"
        wrong = get(url + "/v1/models", headers={"Authorization": "Bearer cle-ключ".encode()})
        assert wrong.status_code == 401
