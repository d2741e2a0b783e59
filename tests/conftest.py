"""Tiny random models and a locally trained tokenizer: the whole suite runs offline in minutes."""
import copy
import json
import random

import pytest

# torch, tokenizers and transformers are imported where used: pytest-xdist's controller process loads this file
# too, and runs no test.

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "piano", "garden", "rocket", "candle",
          "forest", "bridge", "window", "coffee", "violin", "desert"]
PROMPT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
# ChatML as SmolLM2-Instruct writes it, with the tiny tokenizer's one special token ending each turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Two threads on two shared cores wait on each other; tiny models need one (each xdist worker has its own)."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_loss_plot(request):
    """Every finished finetune draws loss.png with matplotlib (0.1 s of CPU, the first in a process 0.7 s): tests
    marked `plots` (the seed command's) check that it is drawn; the other runs in this process leave it out.
    Its own MonkeyPatch: a test's monkeypatch.undo() leaves this one in place."""
    with pytest.MonkeyPatch.context() as patch:
        if request.node.get_closest_marker("plots") is None:
            patch.setattr("lora.train.plot_losses", lambda runs, png_path, title=None: None)
        yield


@pytest.hookimpl(trylast=True)  # after `-m 'not slow'` deselects: the list xdist splits
def pytest_collection_modifyitems(config, items):
    """Long tests first on every worker: under pytest-xdist one left for the end would keep one worker busy while the
    others idle. `--dist worksteal` hands worker i the i-th of n slices of this list (sized as below) and moves
    tests from the end of one worker's slice to an idle worker: each slice starts with its share of the long tests,
    a module's together (they share its fixtures). With them all in the first slice, one worker ran them one after
    another while the other ran the rest."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    modules = {}
    for item in items:
        if item.get_closest_marker("long") is not None:
            modules.setdefault(item.module.__name__, []).append(item)
    rest = [item for item in items if item.get_closest_marker("long") is None]  # in their order
    ordered, left = [], len(items)
    for i in range(workers):
        size = left // (workers - i)
        mine = [item for group in list(modules.values())[i::workers] for item in group]
        take = max(0, size - len(mine))
        ordered += mine + rest[:take]
        del rest[:take]
        left -= size
    items[:] = ordered + rest


def make_records(n, seed=0, task="color"):
    """A small learnable task: a fixed mapping from thing to colour (or to its reversed name)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        if task == "color":
            out = COLORS[THINGS.index(thing) % len(COLORS)]
            records.append({"instruction": f"What colour is the {thing}?", "input": "", "output": out})
        else:
            records.append({"instruction": "Spell the word backwards.", "input": thing, "output": thing[::-1]})
    return records


def train_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [PROMPT] + [json.dumps(r) for t in ("color", "reverse") for r in make_records(200, 1, t)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def save_tiny_model(kind, path, tokenizer, seed=0, layers=2):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id)
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                             initializer_range=0.1, **common)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, initializer_range=0.1, **common)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a chat template (tiny_tokenizer itself has none, like a base model's)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer)


@pytest.fixture(scope="session")
def other_llama(tmp_path_factory, tiny_tokenizer):
    """Same architecture as tiny_llama, other weights: a different base model."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("other-llama"), tiny_tokenizer, seed=1)


def write_task(folder, task="color", n=48, targets="q_proj\nv_proj\n", seed=0):
    """An Alpaca-format task folder: train.json, validation.json, prompt_format.txt, target_modules.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(make_records(n, seed, task)))
    (folder / "validation.json").write_text(json.dumps(make_records(16, seed + 100, task)))
    (folder / "prompt_format.txt").write_text(PROMPT)
    (folder / "target_modules.txt").write_text(targets)
    return folder


@pytest.fixture
def task_dir(tmp_path):
    return write_task(tmp_path / "task")


def finetune_argv(model, task, checkpoint_dir, *extra):
    return ["--model_name_or_path", str(model), "--target_modules_path", str(task / "target_modules.txt"),
            "--prompt_format_path", str(task / "prompt_format.txt"), "--train_data_path", str(task / "train.json"),
            "--checkpoint_dir", str(checkpoint_dir), "--device", "cpu", *map(str, extra)]


def make_adapter(base_path, folder, targets, seed, r=4):
    """A random (seeded) adapter that visibly changes the base model's answers."""
    import torch
    import torch.nn as nn

    import lora

    model = lora.load_model(base_path)[0]
    lora.inject(model, targets, r=r, alpha=2 * r)
    torch.manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.3)
    return lora.save_adapter(model, folder, task={"prompt_format": PROMPT})


def fail_first_sample(monkeypatch):
    """Make the engine's first sampling raise "injected sampler fault" (a step's fault); later ones run as usual."""
    import lora.engine.sampler

    real, calls = lora.engine.sampler.sample, []

    def flaky(logits, batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected sampler fault")
        return real(logits, batch)
    monkeypatch.setattr(lora.engine.sampler, "sample", flaky)
