"""What the server tests share: the app under uvicorn in a thread, errors and metrics as tests read them."""
import contextlib
import functools
import socket
import ssl
import threading
import time

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lora.engine import Engine
from lora.serve import DrainingServer

TASKS = {"color": ("color", 0), "reverse": ("reverse", 0), "color2": ("color", 1), "reverse2": ("reverse", 1)}
QUESTIONS = [f"What colour is the {thing}?" for thing in ("apple", "river", "stone", "violin", "garden")]
CAP = 64  # --max-tokens-cap of the test server
MAX_PROMPTS = 16  # --max-prompts of the test server: the engine's default max_num_seqs
CHAT_SYSTEM = "You name colours."

# httpx (and the OpenAI client's httpx2) builds a TLS context from certifi's bundle for every client it makes:
# 20-40 ms of CPU each, and httpx.get makes a client per call. The tests speak plain HTTP to 127.0.0.1, so all
# their clients share one context; each call still makes its own client and connection, as httpx.get does.
TLS = ssl.create_default_context()
get = functools.partial(httpx.get, verify=TLS)
post = functools.partial(httpx.post, verify=TLS)
request = functools.partial(httpx.request, verify=TLS)


def openai_client(**kwargs):
    """openai.OpenAI(**kwargs) over its default httpx client, with the shared TLS context."""
    return openai.OpenAI(http_client=openai.DefaultHttpxClient(verify=TLS), **kwargs)


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


class GatedEngine(Engine):
    """An Engine whose steps wait while `paused` is clear, and whose thread dies of `kill` when set:
    requests can be made to wait, and the engine made to stop, on purpose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paused, self.kill = threading.Event(), None
        self.paused.set()

    def step(self):
        self.paused.wait()
        if self.kill is not None:
            raise self.kill
        return super().step()


def raw_prompt(question):
    return f"### Instruction:\n{question}\n### Input:\n\n### Response:\n"


def error_of(excinfo):
    """The OpenAI error object of a failed call, checked for OpenAI's shape."""
    body = excinfo.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def metrics(url):
    """/metrics parsed: {(sample name, sorted labels): value}."""
    text = get(url + "/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
