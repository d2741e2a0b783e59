"""Chat data: checking conversations and tokenizing them with the tokenizer's chat template.

Training and serving tokenize a conversation the same way, piece by piece: the template is rendered once per
assistant turn, and each new piece of text (the prompt up to the assistant's turn, then the answer) is
tokenized on its own. So the ids `render_chat` gives a served prompt are exactly the ids training put before
that answer, and each answer's tokens are known without guessing where the template put them.
"""
from jinja2 import TemplateError

from .errors import LoraError

# How each format names its turns: the list's key, each turn's role and text keys, and role names -> OpenAI roles.
TURNS = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value",
                 {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}),
}


def chat_messages(turns, data_format, where):
    """A conversation as OpenAI messages [{"role", "content"}], checked.

    Args:
        turns: the record's list of turns ("messages" or "conversations").
        data_format: "messages" (OpenAI role/content) or "sharegpt" (from/value, roles system/human/gpt).
        where: names the record in errors, e.g. "train.jsonl line 3".
    """
    field, role_key, text_key, roles = TURNS[data_format]
    if not isinstance(turns, list) or not turns:
        raise LoraError(f"{where}: {field!r} must be a non-empty list of {{{role_key!r}: ..., {text_key!r}: ...}} "
                        "objects")
    messages = []
    for j, turn in enumerate(turns):
        at = f"{field}[{j}]"
        if not isinstance(turn, dict):
            raise LoraError(f"{where}: {at} is a {type(turn).__name__}, expected an object with {role_key!r} and "
                            f"{text_key!r}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise LoraError(f"{where}: {at}.{role_key} is {role!r}; use {', '.join(list(roles)[:2])} or "
                            f"{list(roles)[2]}")
        if not isinstance(turn.get(text_key), str):
            raise LoraError(f"{where}: {at}.{text_key} must be a string")
        role = roles[role]
        if role == "system" and j > 0:
            raise LoraError(f"{where}: {at} is a system turn; only the first turn may be one")
        if role == "assistant" and all(m["role"] == "system" for m in messages):
            raise LoraError(f"{where}: {at} is an assistant turn before any user turn; start with a user turn")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def chat_record(rec, data_format, where):
    """A training record's conversation as OpenAI messages; it must hold an assistant turn to learn from.

    A ShareGPT record may give its system message as a top-level "system" string (as LLaMA-Factory reads it).
    """
    field = TURNS[data_format][0]
    messages = chat_messages(rec.get(field), data_format, where)
    system = rec.get("system") if data_format == "sharegpt" else None
    if system is not None and not isinstance(system, str):
        raise LoraError(f"{where}: 'system' must be a string")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise LoraError(f"{where}: {field!r} has no assistant turn, so there is nothing to learn")
    return messages


def encode_chat(tokenizer, messages, where, add_generation_prompt=False):
    """(ids, answer): token ids of a conversation and, per token, whether it belongs to an assistant answer.

    An answer is the assistant's text plus the end-of-turn token(s) the template writes after it (up to its last
    special token, e.g. `<|im_end|>`); separators after that (a newline) are prompt. Turns after the last
    assistant turn are left out unless add_generation_prompt, which renders all turns and the assistant header.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: OpenAI messages, as chat_messages returns them.
        where: names the conversation in errors.
        add_generation_prompt: end with the template's generation prompt (serving).
    """
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids, answer, done = [], [], ""

    def add(text, start, is_answer):
        if not text.startswith(start):
            raise LoraError(f"the tokenizer's chat template renders {where} differently as it grows (a later turn "
                            "changes earlier text), so answers cannot be located; use a template that only appends")
        piece = tokenizer(text[len(start):], add_special_tokens=False)["input_ids"]
        last = -1  # index of the piece's last answer token
        if is_answer:
            ends = [k for k, token in enumerate(piece) if token in special]
            last = ends[-1] if ends else len(piece) - 1
        ids.extend(piece)
        answer.extend(k <= last for k in range(len(piece)))
        return text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = add(render(tokenizer, messages[:i], True, where), done, False)
            done = add(render(tokenizer, messages[:i + 1], False, where), prompt, True)
    if add_generation_prompt:
        add(render(tokenizer, messages, True, where), done, False)
    return ids, answer


def render(tokenizer, messages, add_generation_prompt, where):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise LoraError(f"the tokenizer's chat template rejects {where}: {e}") from None


def check_chat_template(tokenizer, what):
    if not getattr(tokenizer, "chat_template", None):
        raise LoraError(f"{what} is rendered with the tokenizer's chat template, but this tokenizer has none; use a "
                        "model that has one (an -Instruct model), or Alpaca records with a --prompt_format_path")


def render_chat(tokenizer, messages, system_prompt=None):
    """The prompt ids for a conversation, ending with the generation prompt: exactly the ids training put before
    an assistant answer to the same conversation.

    Args:
        tokenizer: the task's tokenizer (with a chat template).
        messages: OpenAI messages [{"role": "system"|"user"|"assistant", "content": str}]; the last is the user's.
        system_prompt: the task's fixed system message (lora_task.json), used when messages have none.
    """
    check_chat_template(tokenizer, "a chat request")
    messages = chat_messages(messages, "messages", "the request")
    if messages[-1]["role"] == "assistant":
        raise LoraError("the request: the last message is the assistant's; end with a user message")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return encode_chat(tokenizer, messages, "the request", add_generation_prompt=True)[0]
