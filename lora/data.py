"""Training data: reading Alpaca and chat files, tokenizing with masked labels, packing, batching, padding."""
import bisect
import json
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .chat import chat_record, check_chat_template, encode_chat
from .errors import LoraError
from .files import MAX_JSON_BYTES, PathLike, read_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the loss skips: prompt and padding tokens
PLACEHOLDER = re.compile(r"\{(\w+)\}")
FIELDS = ("instruction", "input")
MAX_DATA_BYTES = 4 << 30  # the whole file is parsed in memory; past this, split it
FORMAT_KEYS = {"alpaca": "instruction", "messages": "messages", "sharegpt": "conversations"}  # a record's telling key


def read_records(path: PathLike) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """(records, where): the objects of a JSON list or JSON Lines file, and where(i) naming record i in errors."""
    text = read_text(path, what="data file", max_bytes=MAX_DATA_BYTES)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except RecursionError:
            raise LoraError(f"{path} is not valid JSON: nested too deeply") from None
        where = lambda i: f"{path} record {i + 1}"  # noqa: E731
    else:
        records, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as e:
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise LoraError(f"{path} line {lineno} is not valid JSON ({reason}); the file must be a JSON list "
                                    "or one JSON object per line") from None
                lines.append(lineno)
        where = lambda i: f"{path} line {lines[i]}"  # noqa: E731
    if not records:
        raise LoraError(f"{path} holds no examples; add records with instruction, input and output")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LoraError(f"{where(i)} is a {type(rec).__name__}, expected an object (an Alpaca record with "
                            "instruction, input and output, or a chat record)")
    return records, where


def alpaca_record(rec: dict[str, Any], where: str) -> dict[str, str]:
    for key in ("instruction", "output"):
        if not isinstance(rec.get(key), str):
            raise LoraError(f"{where} has no string {key!r}; every record needs instruction and "
                            "output (input is optional)")
    if not isinstance(rec.get("input", ""), str):
        raise LoraError(f"{where}: 'input' must be a string")
    return {"instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"]}


def load_records(path: PathLike) -> list[dict[str, str]]:
    """A JSON list, or JSON Lines, of {"instruction", "input", "output"} objects (Stanford Alpaca format)."""
    records, where = read_records(path)
    return [alpaca_record(rec, where(i)) for i, rec in enumerate(records)]


def check_prompt_format(prompt_format: str, source: str = "prompt format") -> str:
    unknown = sorted({m for m in PLACEHOLDER.findall(prompt_format) if m not in FIELDS})
    if unknown:
        raise LoraError(f"{source} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                        "only {instruction} and {input} are filled in")
    if "{instruction}" not in prompt_format:
        raise LoraError(f"{source} has no {{instruction}} placeholder; add it where the instruction goes")
    return prompt_format


def load_prompt_format(path: PathLike) -> str:
    text = read_text(path, what="prompt format file", max_bytes=MAX_JSON_BYTES)
    return check_prompt_format(text, f"prompt format {path}")


def format_prompt(prompt_format: str, instruction: str, input: str = "") -> str:
    # Plain replacement, not str.format: prompts may contain literal braces (JSON examples, code).
    return prompt_format.replace("{instruction}", instruction).replace("{input}", input or "")


def pad_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """An existing token for padding: adding one would resize embeddings and break adapter portability."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LoraError("the tokenizer has neither a pad nor an eos token; this project never adds tokens, "
                        "so use a tokenizer that defines eos_token")
    return pad


def encode_prompt(tokenizer: "PreTrainedTokenizerBase", prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def encode_alpaca(tokenizer: "PreTrainedTokenizerBase", prompt: str, output: str) -> tuple[list[int], list[bool]]:
    """(ids, answer): prompt + output + EOS, and per token whether it belongs to the answer (output + EOS)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + output_ids, [False] * len(prompt_ids) + [True] * len(output_ids)


def detect_format(rec: dict[str, Any], where: str) -> str:
    for data_format, key in FORMAT_KEYS.items():
        if key in rec:
            return data_format
    raise LoraError(f"{where} has none of 'instruction' (Alpaca), 'messages' (OpenAI chat) or 'conversations' "
                    "(ShareGPT), so its format is unknown; fix the record or set --data_format")


def load_examples(path: PathLike, tokenizer: "PreTrainedTokenizerBase", max_length: int, *, data_format: str = "auto",
                  prompt_format: str | None = None,
                  train_on_inputs: bool = False) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Tokenized training examples of a data file, and what training must record about them.

    Alpaca records are filled into prompt_format; chat records (OpenAI `messages`, ShareGPT `conversations`)
    are rendered with the tokenizer's chat template. Examples over max_length are cut at the end; one whose
    answer starts only after max_length tokens is dropped.

    Args:
        path: JSON list or JSON Lines file.
        tokenizer: the base model's tokenizer.
        max_length: most tokens per example.
        data_format: "auto" (from the first record), "alpaca", "messages" or "sharegpt".
        prompt_format: for Alpaca data, text with {instruction} and optionally {input}.
        train_on_inputs: loss on prompt tokens too, not only on answers (each assistant turn + its end token).

    Returns:
        (examples, info): examples are {"input_ids", "labels"} (labels IGNORE_INDEX where no loss); info is
        {"format", "truncated", "dropped", "task"}, task being what lora_task.json needs to render prompts as
        training did: {"prompt_format"} for Alpaca, {"data_format", "chat_template": True, "system_prompt"} for
        chat (system_prompt: the system message every conversation shares, else None).
    """
    if data_format != "auto" and data_format not in FORMAT_KEYS:
        raise LoraError(f"unknown data format {data_format!r}; use auto, {', '.join(FORMAT_KEYS)}")
    if tokenizer.eos_token_id is None:
        raise LoraError("the tokenizer has no eos_token; the model must learn where an answer ends")
    records, where = read_records(path)
    data_format = detect_format(records[0], where(0)) if data_format == "auto" else data_format
    if data_format == "alpaca":
        if prompt_format is None:
            raise LoraError(f"{path} holds Alpaca records (instruction, input, output), which need a prompt format; "
                            "pass --prompt_format_path")
        check_prompt_format(prompt_format)
        recs = [alpaca_record(rec, where(i)) for i, rec in enumerate(records)]
        encoded = (encode_alpaca(tokenizer, format_prompt(prompt_format, r["instruction"], r["input"]), r["output"])
                   for r in recs)
        task: dict[str, Any] = {"prompt_format": prompt_format}
    else:
        check_chat_template(tokenizer, f"{data_format} data in {path}")
        chats = [chat_record(rec, data_format, where(i)) for i, rec in enumerate(records)]
        encoded = (encode_chat(tokenizer, chat, where(i)) for i, chat in enumerate(chats))
        systems = {chat[0]["content"] if chat[0]["role"] == "system" else None for chat in chats}
        task = {"data_format": data_format, "chat_template": True,
                "system_prompt": systems.pop() if len(systems) == 1 else None}
    examples, truncated, dropped = [], 0, 0
    for ids, answer in encoded:
        first_answer = next((k for k, is_answer in enumerate(answer) if is_answer), len(ids))
        if first_answer >= min(len(ids), max_length):
            dropped += 1
            continue
        truncated += len(ids) > max_length
        labels = ids if train_on_inputs else [t if a else IGNORE_INDEX for t, a in zip(ids, answer)]
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    if not examples:
        raise LoraError(f"every example in {path} is longer than --max_seq_length {max_length} before its output; "
                        "raise --max_seq_length")
    info = {"format": data_format, "truncated": truncated, "dropped": dropped, "task": task}
    return examples, info


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Examples packed into rows of at most max_length tokens, best fit decreasing (as TRL's "bfd").

    Each row is {"input_ids", "labels", "position_ids"}; position_ids restart at 0 for each example, and each
    example's first label is IGNORE_INDEX, so no example learns to predict the next one's first token.
    collate turns rows into batches in which attention cannot cross examples. Deterministic.

    Args:
        examples: {"input_ids", "labels"} dicts, each at most max_length long.
        max_length: tokens per row.
    """
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # space: sorted (free tokens, row index) of rows that still have room
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])):
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise LoraError(f"example {i} has {n} tokens, more than the packing length {max_length}; load the data "
                            "with the same max_length")
        k = bisect.bisect_left(space, (n, -1))  # the fullest row it fits in
        if k < len(space):
            free, r = space.pop(k)
            rows[r].append(i)
        else:
            free, r = max_length, len(rows)
            rows.append([i])
        if free > n:
            bisect.insort(space, (free - n, r))
    packed = []
    for row in rows:
        parts = [examples[i] for i in row]
        packed.append({"input_ids": [t for e in parts for t in e["input_ids"]],
                       "labels": [t for e in parts for t in [IGNORE_INDEX] + e["labels"][1:]],
                       "position_ids": [p for e in parts for p in range(len(e["input_ids"]))]})
    return packed


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices of similar length, so little padding is wasted.

    Indices are shuffled, cut into groups of 50 batches, each group sorted by length and cut into batches; the
    batches are shuffled, then the one holding the longest example goes first (out of memory shows at step 1).
    A pure function of its arguments, so a resumed run sees the same order.

    Args:
        lengths: tokens per example.
        batch_size: examples per batch (the last batch of a group may be smaller).
        seed, epoch: the run's seed and the epoch number.
    """
    if not lengths:
        return []
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = 50 * batch_size
    batches = []
    for start in range(0, len(order), group):
        block = sorted(order[start:start + group], key=lambda i: -lengths[i])
        batches += [block[k:k + batch_size] for k in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def check_packing(model: nn.Module) -> None:
    """Refuse packing where collate's block-diagonal mask would not isolate examples (only SDPA takes it as is)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":
        raise LoraError(f"packing needs the model's attention to be sdpa, not {implementation}: load the model with "
                        "attn_implementation='sdpa', or train without --packing")


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch to pass straight to `model(**batch)`: right-padded, padding with label IGNORE_INDEX.

    Plain examples get a 2D attention_mask. Packed rows (with position_ids, from pack) get position_ids and a
    4D block-diagonal causal attention_mask [batch, 1, length, length] (bool: True = may attend) in which no
    token sees another example; SDPA attention (check_packing) uses it as is. Padding of a packed row is a
    segment of its own. Count target tokens with labels, not attention_mask.

    Args:
        examples: {"input_ids", "labels"} dicts, or pack's rows.
        pad_id: token id for padding (pad_token_id).
    """
    width = max(len(e["input_ids"]) for e in examples)
    packed = "position_ids" in examples[0]
    third = "position_ids" if packed else "attention_mask"
    lists: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], third: []}
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        rows = (e["input_ids"], e.get("labels", e["input_ids"]), e["position_ids"] if packed else [1] * n)
        fill = ([pad_id] * pad, [IGNORE_INDEX] * pad, list(range(pad)) if packed else [0] * pad)
        for key, row, tail in zip(lists, rows, fill):
            lists[key].append(row + tail)
    batch = {k: torch.tensor(v) for k, v in lists.items()}
    if packed:
        starts = batch["position_ids"] == 0
        batch["labels"][starts] = IGNORE_INDEX
        segment = starts.cumsum(-1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        batch["attention_mask"] = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return batch
