"""Constrained decoding: a request's JSON schema, regex, choice list or grammar as a per-row token mask (llguidance).

The flow, and which thread does what:
  request_constraint(body, task_schema) -> Constraint | None     the server, reading the request (cheap)
  guide(tokenizer).compile(constraint) -> Grammar                a worker thread: 1 s once per tokenizer, a few ms
                                                                 once per schema (cached), LoraError if it cannot
  grammar.matcher() -> Matcher                                   per request (a copy, microseconds)
  apply_masks(logits, [matcher or None per row])                 the engine, each step, before sampling
  matcher.advance(token); matcher.is_finished()                  the engine, after sampling
"""
from __future__ import annotations

import copy
import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import llguidance
import llguidance.numpy
import torch

from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text

# Compact JSON as json.dumps writes it (", " and ": ", no other whitespace): a model cannot pad an answer with
# whitespace until max_tokens, and one-line answers are what the example tasks train on. A schema's own
# "x-guidance" key overrides this (llguidance applies defaults, then x-guidance), e.g. {"whitespace_flexible": true}.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "regex", "choice", "grammar")
GRAMMARS_CACHED = 256  # per tokenizer; a grammar is kilobytes
# vLLM's request fields and the kind each asks for; `structured_outputs` is vLLM's newer field holding them all.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# structured_outputs' options that ask for what this module always does (no whitespace, no fallback backend)
STRUCTURED_OPTIONS = {"disable_fallback", "disable_any_whitespace"}
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its answer to; equal constraints share one compiled grammar.

    kind: json | regex | choice | grammar. text: the schema as JSON (property order kept: the answer writes the
    properties in that order), the regex, the choices as a JSON list, or a Lark / GBNF grammar.
    source: the request field it came from, for error messages (not part of equality).
    """
    kind: str
    text: str
    source: str = field(default="", compare=False)

    @property
    def schema(self) -> dict | None:
        """The JSON schema, for a json constraint (what jsonschema validates answers against)."""
        return json.loads(self.text) if self.kind == "json" else None


def constraint(kind: str, value: Any, source: str) -> Constraint:
    """A Constraint from one request field's value, or a LoraError naming the field and what it must be."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise LoraError(f"{source} is not valid JSON ({e}); give a JSON schema object") from None
        if not isinstance(value, dict):
            raise LoraError(f"{source} must be a JSON schema object, got {type(value).__name__}")
        return Constraint("json", json.dumps(value, ensure_ascii=False), source)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise LoraError(f"{source} must be a non-empty list of non-empty strings, got {value!r}")
        return Constraint("choice", json.dumps(value, ensure_ascii=False), source)
    if kind in ("regex", "grammar"):
        if not (isinstance(value, str) and value):
            raise LoraError(f"{source} must be a non-empty string, got {value!r}")
        return Constraint(kind, value, source)
    raise LoraError(f"unknown constraint kind {kind!r}; use one of {', '.join(KINDS)}")


def _response_format(value: Any) -> Constraint | None:
    """OpenAI's response_format: text (no constraint), json_object (any object) or json_schema."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return constraint("json", ANY_OBJECT, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise LoraError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return constraint("json", spec["schema"], "response_format.json_schema.schema")
    raise LoraError(f'response_format must be {{"type": "text"}}, {{"type": "json_object"}} or {{"type": '
                    f'"json_schema", "json_schema": {{"schema": ...}}}}, got {value!r}')


def _structured_outputs(value: Any) -> Constraint | None:
    """vLLM's structured_outputs object: exactly one of json, regex, choice, grammar or json_object: true."""
    if not isinstance(value, dict):
        raise LoraError(f"structured_outputs must be an object, got {type(value).__name__}")
    unknown = set(value) - {*KINDS, "json_object"} - STRUCTURED_OPTIONS
    if unknown:
        raise LoraError(f"structured_outputs has unsupported keys {sorted(unknown)}; use one of json, regex, "
                        "choice, grammar or json_object")
    given = [k for k in KINDS if value.get(k) is not None]
    given += ["json_object"] if value.get("json_object") else []
    if len(given) > 1:
        raise LoraError(f"structured_outputs gives {' and '.join(given)}; give one of them")
    if not given:
        return None
    if given[0] == "json_object":
        return constraint("json", ANY_OBJECT, "structured_outputs.json_object")
    return constraint(given[0], value[given[0]], f"structured_outputs.{given[0]}")


def request_constraint(body: Mapping[str, Any], default_schema: dict | None = None) -> Constraint | None:
    """The constraint an OpenAI / vLLM request body asks for; else the task's default schema; else None.

    Reads response_format, guided_json / guided_regex / guided_choice / guided_grammar and structured_outputs;
    at most one may be given. response_format {"type": "text"} turns the task's default schema off.
    """
    asked: dict[str, Constraint | None] = {}
    if body.get("response_format") is not None:
        asked["response_format"] = _response_format(body["response_format"])
    for name, kind in GUIDED_FIELDS.items():
        if body.get(name) is not None:
            asked[name] = constraint(kind, body[name], name)
    if body.get("structured_outputs") is not None:
        asked["structured_outputs"] = _structured_outputs(body["structured_outputs"])
    if len(asked) > 1:
        raise LoraError(f"the request gives {' and '.join(asked)}; give one of them (each constrains the whole answer)")
    if asked:
        return next(iter(asked.values()))
    return None if default_schema is None else constraint("json", default_schema, "the task's response_schema")


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for a constraint (tokenizer-free; not yet checked)."""
    try:
        if c.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if c.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(c.text)
        if c.kind == "choice":
            return llguidance.grammar_from("choice", c.text)
        return llguidance.grammar_from("grammar", c.text)
    except ValueError as e:
        raise LoraError(f"{c.source or c.kind}: {e}") from None


def _refused(c: Constraint, error: str) -> LoraError:
    what = {"json": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "grammar"}[c.kind]
    return LoraError(f"{c.source or c.kind}: the {what} cannot be compiled: {error.strip()}; fix it or leave it out")


def check_response_schema(schema: Any, where: str) -> dict:
    """A task's default schema (lora_task.json's response_schema), checked without a tokenizer; LoraError if bad."""
    if not isinstance(schema, dict):
        raise LoraError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
    c = constraint("json", schema, where)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_text(c))
    if is_error:
        raise _refused(c, messages[0])
    return schema


def load_response_schema(path: str) -> dict:
    """`lora finetune --response_schema FILE`: the JSON schema in FILE, checked, to store in lora_task.json."""
    text = read_text(path, what="--response_schema file", max_bytes=MAX_JSON_BYTES)
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LoraError(f"--response_schema {path} is not valid JSON: {e}") from None
    return check_response_schema(schema, f"--response_schema {path}")


class Grammar:
    """A compiled constraint for one tokenizer: a fresh matcher per request is a cheap copy of it."""

    def __init__(self, c: Constraint, template: llguidance.LLMatcher, vocab_size: int) -> None:
        self.constraint, self._template, self._vocab_size = c, template, vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self._vocab_size)


class Matcher:
    """One request's place in its grammar: which tokens it may sample next; advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's, which sizes the bitmask; a model's logits may be wider

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens into row `row` of a CPU bitmask from `allocate_bitmask(n, self.vocab_size)`."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask.numpy(), row)  # the same memory

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: True for each token this request may sample next."""
        bitmask = allocate_bitmask(1, self.vocab_size)
        self.fill(bitmask, 0)
        return unpack_bitmask(bitmask, vocab_size)[0]

    def advance(self, token_id: int) -> None:
        """Take the sampled token; a LoraError if the grammar does not allow it (sampled without its mask)."""
        if not self._matcher.consume_token(token_id):
            raise LoraError(f"token {token_id} breaks the request's grammar: {self._matcher.get_error()}")

    def is_finished(self) -> bool:
        """The answer is complete: the grammar allows nothing more (the engine then stops with "stop")."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """What was generated so far is a complete answer (ending here, e.g. at max_tokens, is valid)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        """Why the grammar failed (a parser limit, a token it did not allow); "" while it has not."""
        return self._matcher.get_error()


class Guide:
    """A tokenizer bound to llguidance once, and the grammars compiled for it (cached per constraint)."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise LoraError(f"structured output needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} "
                            "is not one: save the model with its tokenizer.json")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=tokenizer.eos_token_id)
        self.compile = lru_cache(maxsize=GRAMMARS_CACHED)(self._compile)
        self._bytes: dict[int, bytes] = {}

    def _compile(self, c: Constraint) -> Grammar:
        """The constraint's grammar, or a LoraError naming the problem. Takes milliseconds: not on the engine thread."""
        template = llguidance.LLMatcher(self.tokenizer, grammar_text(c), log_level=0)
        # The first mask builds the lexer states every copy shares (~20 ms on SmolLM2): here, in the worker
        # thread, rather than on the engine thread's first step for this schema.
        template.compute_bitmask()
        if template.is_error():
            raise _refused(c, template.get_error())
        return Grammar(c, template, self.tokenizer.vocab_size)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (special tokens: their text), as OpenAI's logprobs `bytes` give them."""
        if token_id not in self._bytes:
            self._bytes[token_id] = self.tokenizer.decode_bytes([token_id])
        return self._bytes[token_id]


_guides: weakref.WeakKeyDictionary[Any, Guide] = weakref.WeakKeyDictionary()
_guides_lock = threading.Lock()


def guide(tokenizer: Any) -> Guide:
    """The Guide for a tokenizer, made on first use (about a second) and kept while the tokenizer lives."""
    with _guides_lock:
        found = _guides.get(tokenizer)
        if found is None:
            found = _guides[tokenizer] = Guide(tokenizer)
        return found


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [rows, vocab_size] from llguidance's int32 bitmask (bit j of word w: token 32 w + j).

    Tokens past the tokenizer's vocabulary (a model may pad its embedding) are never allowed.
    """
    bits = (bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1
    allowed = bits.view(bitmask.shape[0], -1).bool()
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask for `rows` matchers over a vocabulary (CPU, as llguidance writes it)."""
    return torch.zeros(rows, -(-vocab_size // 32), dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: Sequence[Matcher | None]) -> list[int]:
    """Set to -inf, in place, each token a row's matcher does not allow; rows without one are left untouched.

    logits: [len(rows), vocab] float32, one row per sequence sampled this step (any device). Constrained and
    free requests share one batch: only the constrained rows are read or written.
    Returns the rows whose grammar failed (matcher.error says why; e.g. a parser limit): they are left unmasked,
    and the engine ends those requests with finish_reason "error" instead of sampling from them.
    """
    picked = [i for i, m in enumerate(rows) if m is not None]
    if not picked:
        return []
    matchers = [m for m in rows if m is not None]
    bitmask = allocate_bitmask(len(picked), matchers[0].vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    failed = [i for i, m in zip(picked, matchers) if m.error]
    if failed:
        keep = [row for row, i in enumerate(picked) if i not in failed]
        picked, bitmask = [picked[row] for row in keep], bitmask[keep]
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    if len(picked) == len(rows):
        logits.masked_fill_(~allowed, -torch.inf)
    elif picked:
        index = torch.tensor(picked, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, -torch.inf)
    return failed
