"""A request's prompt token ids, rendered exactly as its task's training data was."""
from typing import Any

from .chat import render_chat
from .data import encode_prompt, format_prompt
from .errors import LoraError

DEFAULT_PROMPT_FORMAT = "{instruction}\n\n{input}"


def user_content(instruction: str, input: str = "") -> str:
    """The user message an Alpaca-style request (instruction, input) becomes for a task trained on chat data.

    Chat data converted from Alpaca records should use it too, so training and serving see the same text.
    """
    return f"{instruction}\n\n{input}" if input else instruction


def last_user_message(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise LoraError("messages hold no user message; add one with role 'user'")
    return users[-1]


def prompt_ids(tokenizer: Any, meta: dict | None, *, instruction: str = "", input: str = "",
               messages: list[dict[str, str]] | None = None, prompt: str | None = None,
               prompt_format: str | None = None) -> list[int]:
    """The prompt token ids a request to a task gets.

    Args:
        tokenizer: the base model's tokenizer.
        meta: the task's lora_task.json (`MultiTaskModel.task_meta`); None for the base model.
        instruction, input: an Alpaca-style request.
        messages: a chat ([{"role", "content"}]) instead: a task trained on chat data, and the base model
            when its tokenizer has a chat template, get the template over all messages; a task trained on
            Alpaca data gets its prompt format with the last user message as the instruction.
        prompt: raw text, encoded as it is (wins over everything else).
        prompt_format: a format to use instead of the task's own.
    """
    if prompt is not None:
        return encode_prompt(tokenizer, prompt)
    chat = bool(meta.get("chat_template")) if meta is not None else bool(getattr(tokenizer, "chat_template", None))
    if messages is not None and chat and prompt_format is None:
        return render_chat(tokenizer, messages, (meta or {}).get("system_prompt"))
    if messages is not None:
        instruction, input = last_user_message(messages), ""
    if meta is not None and meta.get("chat_template") and prompt_format is None:
        messages = [{"role": "user", "content": user_content(instruction, input)}]
        return render_chat(tokenizer, messages, meta.get("system_prompt"))
    fmt = prompt_format or (meta or {}).get("prompt_format") or DEFAULT_PROMPT_FORMAT
    return encode_prompt(tokenizer, format_prompt(fmt, instruction, input))
