"""A request to a task is rendered into exactly the token ids its training data was."""
import copy
import json

import pytest

import lora
from lora.chat import encode_chat, split_by_prefixes
from lora.data import load_examples
from tests.conftest import save_tiny_model

CONVERSATION = [{"role": "system", "content": "Answer with one colour."},
                {"role": "user", "content": "What colour is the apple?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the river?"}, {"role": "assistant", "content": "blue"}]


def test_chat_task_requests_get_the_ids_training_used(tmp_path, chat_tokenizer):
    base = save_tiny_model("llama", tmp_path / "chat-llama", chat_tokenizer)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(2)))
    model, tokenizer = lora.load_model(base)
    (example, *_), info = load_examples(str(data), tokenizer, 256)
    lora.inject(model, ["q_proj"])
    lora.save_adapter(model, tmp_path / "adapter", task=info["task"])
    assert info["task"]["chat_template"] and info["task"]["system_prompt"] == "Answer with one colour."

    mt = lora.MultiTaskModel(base, {"chat": tmp_path / "adapter"})
    labels = example["labels"]
    answer_starts = [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]
    trained_prompt = example["input_ids"][:answer_starts[-1]]
    # The whole conversation (the system prompt it was trained with comes from the adapter), as the chat API sends it:
    assert mt.prompt_ids({"downstream": "chat", "messages": CONVERSATION[1:-1]}) == trained_prompt
    # One question, as generate_response sends it, is the same conversation's first turn:
    assert mt.prompt_ids({"downstream": "chat", "instruction": "What colour is the apple?"}) == \
        example["input_ids"][:answer_starts[0]]


TEMPLATES = {
    "chatml": None,  # the tiny tokenizer's own (CHAT_TEMPLATE): one render finds every answer
    "trimmed": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}{{ eos_token }}\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "numbered": "{% for m in messages %}[{{ loop.index }}:{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
                "{% endfor %}{% if add_generation_prompt %}[{{ messages | length + 1 }}:assistant] {% endif %}",
}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_a_long_chat_gets_the_ids_of_one_render_per_turn(chat_tokenizer, template):
    """Tokenizing from one render of the whole chat gives exactly the ids of the definition (the template
    rendered once per assistant turn), for templates that write every turn alike and ones that do not."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = TEMPLATES[template] or tokenizer.chat_template
    messages = [{"role": "system", "content": "Answer with one colour."}] + [
        {"role": role, "content": f" turn {i} of the {role} " if i % 3 else ""}
        for i in range(40) for role in ("user", "assistant")]
    for add_generation_prompt, turns in ((False, messages), (True, messages[:-1])):
        pieces = split_by_prefixes(tokenizer, turns, add_generation_prompt, "the chat")
        ids, answer = encode_chat(tokenizer, turns, "the chat", add_generation_prompt)
        assert ids == [t for text, _ in pieces for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        answers = sum(m["role"] == "assistant" for m in turns)
        assert tokenizer.decode([t for t, a in zip(ids, answer) if a]).count(tokenizer.eos_token) == answers
