"""A request to a task is rendered into exactly the token ids its training data was."""
import json

import lora
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
