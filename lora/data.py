"""Alpaca-format data: reading records, filling prompt formats, tokenizing with masked labels, padding."""
import json
import re

import torch

from .errors import LoraError

IGNORE_INDEX = -100  # label value the loss skips: prompt and padding tokens
PLACEHOLDER = re.compile(r"\{(\w+)\}")
FIELDS = ("instruction", "input")


def load_records(path):
    """A JSON list, or JSON Lines, of {"instruction", "input", "output"} objects (Stanford Alpaca format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LoraError(f"cannot read data file {path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        where = lambda i: f"record {i + 1}"  # noqa: E731
    else:
        records, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LoraError(f"{path} line {lineno} is not valid JSON ({e.msg}); the file must be a JSON list "
                                    "or one JSON object per line") from None
                lines.append(lineno)
        where = lambda i: f"line {lines[i]}"  # noqa: E731
    if not records:
        raise LoraError(f"{path} holds no examples; add records with instruction, input and output")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LoraError(f"{path} {where(i)} is a {type(rec).__name__}, expected an object with "
                            "instruction, input and output")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise LoraError(f"{path} {where(i)} has no string {key!r}; every record needs instruction and "
                                "output (input is optional)")
        if not isinstance(rec.get("input", ""), str):
            raise LoraError(f"{path} {where(i)}: 'input' must be a string")
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in records]


def check_prompt_format(prompt_format, source="prompt format"):
    unknown = sorted({m for m in PLACEHOLDER.findall(prompt_format) if m not in FIELDS})
    if unknown:
        raise LoraError(f"{source} has unknown placeholder(s) {', '.join('{%s}' % u for u in unknown)}; "
                        "only {instruction} and {input} are filled in")
    if "{instruction}" not in prompt_format:
        raise LoraError(f"{source} has no {{instruction}} placeholder; add it where the instruction goes")
    return prompt_format


def load_prompt_format(path):
    try:
        with open(path, encoding="utf-8") as f:
            return check_prompt_format(f.read(), f"prompt format {path}")
    except OSError as e:
        raise LoraError(f"cannot read prompt format file {path}: {e.strerror}") from None


def format_prompt(prompt_format, instruction, input=""):
    # Plain replacement, not str.format: prompts may contain literal braces (JSON examples, code).
    return prompt_format.replace("{instruction}", instruction).replace("{input}", input or "")


def pad_token_id(tokenizer):
    """An existing token for padding: adding one would resize embeddings and break adapter portability."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LoraError("the tokenizer has neither a pad nor an eos token; this project never adds tokens, "
                        "so use a tokenizer that defines eos_token")
    return pad


def encode_prompt(tokenizer, prompt):
    return tokenizer(prompt)["input_ids"]


def encode_example(tokenizer, prompt, output, max_length):
    """Token ids of prompt + output + EOS, with labels only on output + EOS. None if nothing is left to learn."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + output_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + output_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def load_dataset(path, tokenizer, prompt_format, max_length):
    """Tokenized examples of a data file, and how many had to be cut to max_length."""
    if tokenizer.eos_token_id is None:
        raise LoraError("the tokenizer has no eos_token; the model must learn where an answer ends")
    examples, truncated = [], 0
    for rec in load_records(path):
        ex = encode_example(tokenizer, format_prompt(prompt_format, rec["instruction"], rec["input"]),
                            rec["output"], max_length)
        if ex is None or len(ex["input_ids"]) == max_length:
            truncated += 1
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise LoraError(f"every example in {path} is longer than --max_seq_length {max_length} before its output; "
                        "raise --max_seq_length")
    return examples, truncated


def collate(examples, pad_id):
    """Right-pad a list of encoded examples into a batch; padding gets attention 0 and label IGNORE_INDEX."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        rows = (e["input_ids"], [1] * n, e.get("labels", e["input_ids"]))
        fill = (pad_id, 0, IGNORE_INDEX)
        for key, row, value in zip(batch, rows, fill):
            batch[key].append(row + [value] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}
