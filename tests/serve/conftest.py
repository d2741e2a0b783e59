"""Fixtures of the server tests: random task adapters, the tiny chat model, and one server for a module."""
import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.conftest import CHAT_TEMPLATE, make_adapter
from tests.serve.helpers import CAP, CHAT_SYSTEM, TASKS, openai_client, serving

TARGETS = {"color": ["q_proj", "v_proj"], "reverse": ["q_proj", "k_proj", "o_proj"]}


def random_adapter(model, folder, task, seed):
    return make_adapter(model, folder, TARGETS[task], seed=seed + (0 if task == "color" else 10))


def chat_adapter(source, folder):
    """A copy of an adapter whose lora_task.json says it was trained on chat data with a system prompt."""
    shutil.copytree(source, folder)
    meta = json.loads((folder / "lora_task.json").read_text())
    meta.pop("prompt_format", None)
    meta.update(data_format="messages", chat_template=True, system_prompt=CHAT_SYSTEM)
    (folder / "lora_task.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="package")
def adapters(tmp_path_factory, tiny_llama):
    """Four Alpaca task adapters and a chat one (random weights: what is served, not what is learned, is under
    test), plus an adapter root holding one more (`extra`), an empty folder, a symlink that leads out of the
    root, and checkpoints an attacker would write."""
    root = tmp_path_factory.mktemp("serve")
    for name, (task, seed) in TASKS.items():
        random_adapter(tiny_llama, root / name, task, seed)
    paths = {name: root / name for name in TASKS}
    paths["color-chat"] = chat_adapter(paths["color"], root / "color-chat")
    adapter_root = root / "adapter-root"
    adapter_root.mkdir()
    random_adapter(tiny_llama, adapter_root / "extra", "reverse", 2)
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


@pytest.fixture(scope="package")
def chat_llama(tmp_path_factory, tiny_llama):
    """tiny_llama with a chat template, as an -Instruct model ships: the chat task needs one."""
    folder = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(chat_llama, adapters):
    paths, adapter_root = adapters
    mt = MultiTaskModel(chat_llama, paths)
    app = create_app(mt, served_model_name="tiny", adapter_root=str(adapter_root), max_tokens_cap=CAP)
    with serving(app) as url:
        yield url, mt


@pytest.fixture(scope="package")
def reference(chat_llama, adapters):
    """The library's own answers, one request at a time, from a model the server does not share."""
    mt = MultiTaskModel(chat_llama, adapters[0])
    mt.add_downstream("extra", adapters[1] / "extra")
    return mt


@pytest.fixture
def client(server):
    return openai_client(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
