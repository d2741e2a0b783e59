"""An Ollama model folder for one task: the adapter GGUF and a Modelfile that asks the task as it was trained.

The Modelfile's TEMPLATE is the task's own prompt, written out once with Ollama's placeholders where the
request goes: the Alpaca prompt format with the user's message as {instruction} (and {input} empty), or the
chat template rendered around one user message (and the task's system prompt, as SYSTEM), exactly the text
lora.prompts.prompt_ids tokenizes for the same request here. `ollama create NAME -f FOLDER/Modelfile` then
`ollama run NAME` serves it.
"""
import os

from ..chat import check_chat_template, render
from ..checkpoint import Adapter, atomic_directory
from ..errors import LoraError
from ..gguf_adapter import write_gguf_adapter
from ..gguf_layout import Layout
from ..prompts import DEFAULT_PROMPT_FORMAT

ADAPTER_FILE = "adapter.gguf"
SYSTEM_MARK, PROMPT_MARK = "\x00system\x00", "\x00prompt\x00"  # stand-ins no real text holds


def go_text(text: str) -> str:
    """Literal text inside a Go template: only "{{" would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def _fill(text: str, marks: dict[str, str]) -> str:
    """`text` escaped for Go, each mark replaced by its placeholder (every mark must appear exactly once)."""
    pieces = [text]
    for mark, placeholder in marks.items():
        if text.count(mark) != 1:
            raise LoraError("the chat template changes the message text it is given, so no Ollama TEMPLATE can "
                            "reproduce it; serve this task with lora serve or llama.cpp's --chat-template")
        pieces = [part for piece in pieces for part in _split_keep(piece, mark, placeholder)]
    return "".join(p if p in marks.values() else go_text(p) for p in pieces)


def _split_keep(text: str, mark: str, placeholder: str) -> list[str]:
    if mark not in text:
        return [text]
    before, after = text.split(mark)
    return [before, placeholder, after]


def ollama_template(tokenizer: object, task: dict) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM or None) rendering a one-message request to `task` as training rendered its prompts."""
    if not task.get("chat_template"):
        fmt = (task.get("prompt_format") or DEFAULT_PROMPT_FORMAT).replace("{input}", "")
        template = _fill(fmt.replace("{instruction}", PROMPT_MARK), {PROMPT_MARK: "{{ .Prompt }}"})
        return template + "{{ .Response }}", None
    check_chat_template(tokenizer, "the task")
    system = task.get("system_prompt")
    messages = [{"role": "system", "content": SYSTEM_MARK}] if system is not None else []
    text = render(tokenizer, [*messages, {"role": "user", "content": PROMPT_MARK}], True, "one user message")
    marks = {PROMPT_MARK: "{{ .Prompt }}", **({SYSTEM_MARK: "{{ .System }}"} if system is not None else {})}
    return _fill(text, marks) + "{{ .Response }}", system


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise LoraError(f"the {what} holds '\"\"\"', which a Modelfile cannot quote; change it")
    return f'"""{text}"""'


def modelfile(base: str, template: str, system: str | None, stop: str | None) -> str:
    """The Modelfile text: FROM the base, ADAPTER the task, its TEMPLATE, SYSTEM and end-of-turn stop."""
    lines = [f"FROM {base}", f"ADAPTER ./{ADAPTER_FILE}", f"TEMPLATE {_quoted(template, 'prompt template')}"]
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_ollama(adapter: Adapter, layout: Layout, tokenizer: object, base: str, out: str, outtype: str = "f32") -> str:
    """Write the Ollama folder for `adapter` at `out` (replaced atomically): adapter.gguf and Modelfile.

    Args:
        adapter: the task adapter (its lora_task.json says how prompts were rendered).
        layout: the base model's GGUF layout.
        tokenizer: the base model's tokenizer (chat template, end-of-turn token).
        base: what FROM names: the base model's GGUF file, or a model folder Ollama can import.
        out: the folder to write.
        outtype: f32 or f16 for the adapter's tensors.
    """
    template, system = ollama_template(tokenizer, adapter.task)
    stop = getattr(tokenizer, "eos_token", None)  # training ends every answer (and turn) with it
    text = modelfile(os.path.abspath(base), template, system, stop)
    try:
        with atomic_directory(out) as tmp:
            write_gguf_adapter(adapter, layout, os.path.join(tmp, ADAPTER_FILE), outtype)
            with open(os.path.join(tmp, "Modelfile"), "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        raise LoraError(f"cannot write the Ollama folder {out}: {e.strerror or e}; pass another --out") from None
    return os.fspath(out)
