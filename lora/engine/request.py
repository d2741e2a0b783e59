"""What a request is: its sampling limits (SamplingParams.check, the one validator), its Output, its state."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LoraError
from ..logprobs import TokenLogprobs
from ..structured import Grammar, Matcher

Spec = tuple[tuple[str, float], ...] | None  # the tasks object's normalize() form: None (base) or ((task, weight), ...)
FINISH_REASONS = ("stop", "length", "abort", "error")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each stop string; the check runs on every new piece of text, so both are bounded
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)


class QueueFull(LoraError):
    """Too many requests or prompt tokens are waiting; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(LoraError):
    """The engine's thread stopped; no request can be answered until the server restarts."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 (or vLLM's -1) and top_p 1 are off.

    grammar: a compiled constraint (lora.structured: guide(tokenizer).compile(...), done by the caller, never on
    the engine thread); each step masks the request's row with it, and the answer ends ("stop") when it is complete.
    logprobs: the sampled tokens' log-probabilities and this many alternatives each (0-20; None: none).
    prompt_logprobs: the prompt tokens' log-probabilities and this many alternatives (echo); with it, max_tokens
    may be 0 (the prompt's likelihood alone). Such a request computes its whole prompt (no prefix reuse).
    """
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop: tuple[str, ...] | list[str] | str = ()
    ignore_eos: bool = False
    seed: int | None = None
    grammar: Grammar | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> SamplingParams:
        """Refuse values out of range (LoraError naming the field and the fix); normalise stop and top_k."""
        def refuse(name: str, fix: str) -> LoraError:
            return LoraError(f"sampling parameter {name}={getattr(self, name)!r} is out of range: {fix}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise refuse(name, f"use an integer from 0 to {MAX_LOGPROBS}, or leave it unset")
        if not _is_int(self.max_tokens) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise refuse("max_tokens", "use an integer of at least 1 (0 only with prompt_logprobs: the prompt's "
                                       "log-probabilities alone)")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise refuse("grammar", "compile the constraint with lora.structured.guide(tokenizer).compile(...)")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise refuse("temperature", "use a finite number >= 0 (0 is greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise refuse("top_p", "use a number in (0, 1] (1 is off)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise refuse("top_k", "use an integer >= 0 (0 or -1 is off)")
        self.top_k = max(self.top_k, 0)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise refuse("min_tokens", "use an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise LoraError(f"sampling parameter min_tokens={self.min_tokens} is over max_tokens={self.max_tokens}: "
                            "lower min_tokens or raise max_tokens")
        if self.seed is not None and not _is_int(self.seed):
            raise refuse("seed", "use an integer or leave it unset")
        if not isinstance(self.ignore_eos, bool):
            raise refuse("ignore_eos", "use true or false")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise refuse("stop", "use a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise LoraError(f"sampling parameter stop has {len(stop)} strings of up to {max(map(len, stop))} "
                            f"characters: use at most {MAX_STOP_STRINGS} of at most {MAX_STOP_CHARS} characters")
        self.stop = tuple(s for s in stop if s)
        return self


@dataclass
class Output:
    """What a request's callback gets after each step that changed it (generate() returns the last one)."""
    request_id: str
    text: str  # the visible answer so far (stop strings cut, a possible stop string's start held back)
    delta: str  # visible text new since the previous Output
    new_token_ids: list[int]  # tokens new since the previous Output (generate(): every token of the answer)
    num_tokens: int  # tokens generated so far
    num_prompt_tokens: int
    finished: bool
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    error: BaseException | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new_token_ids, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs] | None = None  # one per prompt token, on the first Output, when asked


@dataclass(eq=False)
class Request:
    """One request's state from add_request to its last Output: the engine's, scheduler's and runner's record."""
    request_id: str
    prompt: np.ndarray  # token ids (int32): all a waiting request holds of its text
    spec: Spec
    sampling: SamplingParams
    on_output: Callable[[Output], None] | None = None
    generator: torch.Generator | None = None  # its own random stream when it has a seed
    matcher: Matcher | None = None  # its place in its grammar, when it has one
    arrival: int = 0  # the scheduler step at which it was queued (aging)
    order: int = 0  # its place in the queue, first come first served (the scheduler's)
    held: int = 0  # steps it waited for a running request to prefill its prompt's prefix (see scheduler)
    slot: int = -1  # its place in the KV cache while running
    computed: int = 0  # prompt tokens whose K/V are in the cache
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the answer decoded so far (incrementally; see output.py)
    sent: int = 0  # characters of text already handed out
    prefix_offset: int = 0  # incremental detokenizer: tokens[prefix_offset:read_offset] were decoded last time
    read_offset: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # filled chunk by chunk, when asked for
    output: Output | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def decoding(self) -> bool:
        """Its prompt is in the cache: it takes one token per step."""
        return self.computed == len(self.prompt)

    @property
    def echo(self) -> bool:
        """It wants its prompt's log-probabilities: every prompt position's logits are kept."""
        return self.sampling.prompt_logprobs is not None

    @property
    def task_names(self) -> list[str]:
        return [name for name, _ in self.spec] if self.spec else []
