"""Chat data: checking conversations and tokenizing them with the tokenizer's chat template.

Training and serving tokenize a conversation the same way, piece by piece: each piece of the template's text
(the prompt up to an assistant's turn, then the answer) is tokenized on its own. The pieces come from one
render of the whole conversation (linear in its length), or, for templates that write turns differently by
position, from one render per assistant turn. So the ids `render_chat` gives a served prompt are exactly the
ids training put before that answer, and each answer's tokens are known without guessing where the template put them.
"""
import uuid
from typing import Any

from jinja2 import TemplateError

from .errors import LoraError

Message = dict[str, str]  # {"role": ..., "content": ...}

# How each format names its turns: the list's key, each turn's role and text keys, and role names -> OpenAI roles.
TURNS = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value",
                 {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}),
}


def chat_messages(turns: Any, data_format: str, where: str) -> list[Message]:
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
    messages: list[Message] = []
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


def chat_record(rec: dict, data_format: str, where: str) -> list[Message]:
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


def encode_chat(tokenizer: Any, messages: list[Message], where: str,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
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
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if not add_generation_prompt:
        messages = messages[:last + 1]
    pieces = split_rendered(tokenizer, messages, add_generation_prompt) or split_by_prefixes(
        tokenizer, messages, add_generation_prompt, where)
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids: list[int] = []
    answer: list[bool] = []
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
    for (_, is_answer), piece in zip(pieces, encoded):
        end = -1  # index of the piece's last answer token
        if is_answer:
            ends = [k for k, token in enumerate(piece) if token in special]
            end = ends[-1] if ends else len(piece) - 1
        ids.extend(piece)
        answer.extend(k <= end for k in range(len(piece)))
    return ids, answer


def split_by_prefixes(tokenizer: Any, messages: list[Message], add_generation_prompt: bool,
                      where: str) -> list[tuple[str, bool]]:
    """The conversation's text as (piece, is_answer): the prompt up to each assistant turn, then the turn.

    The definition: the template rendered once per assistant turn, each piece the text a longer render adds.
    Quadratic in the number of turns (requests bound them, see `split_rendered` for the usual linear way).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""

    def add(text: str, start: str, is_answer: bool) -> str:
        if not text.startswith(start):
            raise LoraError(f"the tokenizer's chat template renders {where} differently as it grows (a later turn "
                            "changes earlier text), so answers cannot be located; use a template that only appends")
        pieces.append((text[len(start):], is_answer))
        return text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = add(render(tokenizer, messages[:i], True, where), done, False)
            done = add(render(tokenizer, messages[:i + 1], False, where), prompt, True)
    if add_generation_prompt:
        add(render(tokenizer, messages, True, where), done, False)
    return pieces


def split_rendered(tokenizer: Any, messages: list[Message],
                   add_generation_prompt: bool) -> list[tuple[str, bool]] | None:
    """`split_by_prefixes`'s pieces from one render of the whole conversation, in time linear in its length.

    Each assistant answer is rendered as a unique marker, found in the text, and framed by what the template
    writes around an answer (its generation prompt before, its end of turn after: learned from a two-turn
    render). Every frame is checked where it is expected, and the text with the answers put back must equal
    the template's own render; None when any check fails (a template that writes turns differently by
    position), and the caller falls back to rendering per turn.
    """
    nonce = uuid.uuid4().hex
    marker = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
    try:
        one = [{"role": "user", "content": "x"}]
        plain, prompted = render_raw(tokenizer, one, False), render_raw(tokenizer, one, True)
        answered = render_raw(tokenizer, [*one, {"role": "assistant", "content": marker[0]}], False)
        marked = render_raw(tokenizer, [{**m, "content": marker[i]} if m["role"] == "assistant" else m
                                        for i, m in enumerate(messages)], add_generation_prompt)
        whole = render_raw(tokenizer, messages, add_generation_prompt)
    except TemplateError:
        return None
    if not (prompted.startswith(plain) and answered.startswith(prompted) and answered.count(marker[0]) == 1):
        return None
    opening = prompted[len(plain):]  # the generation prompt
    head, _, tail = answered[len(prompted):].partition(marker[0])  # around an answer: e.g. "" and "<|im_end|>\n"
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        at = marked.find(marker[i], done)  # markers are unique: the nonce is random
        start, end = at - len(head), at + len(marker[i]) + len(tail)
        if at < 0 or start < done or marked[start - len(opening):start] != opening \
                or marked[start:at] != head or marked[at + len(marker[i]):end] != tail:
            return None
        pieces += [(marked[done:start], False), (head + message["content"] + tail, True)]
        done = end
    if add_generation_prompt:
        pieces.append((marked[done:], False))
    elif done != len(marked):
        return None
    if "".join(text for text, _ in pieces) != whole:
        return None
    return pieces


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool, where: str) -> str:
    try:
        return render_raw(tokenizer, messages, add_generation_prompt)
    except TemplateError as e:
        raise LoraError(f"the tokenizer's chat template rejects {where}: {e}") from None


def render_raw(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_chat_template(tokenizer: Any, what: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LoraError(f"{what} is rendered with the tokenizer's chat template, but this tokenizer has none; use a "
                        "model that has one (an -Instruct model), or Alpaca records with a --prompt_format_path")


def render_chat(tokenizer: Any, messages: Any, system_prompt: str | None = None) -> list[int]:
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
