"""Which requests run in the next step: queues, admission into KV capacity, chunked prefill, task sharing, aging.

Pure bookkeeping, no model: the engine asks `schedule()` for a StepPlan, runs it, then calls `release()`.
A step holds the next token of every decoding request, then prompt chunks of prefilling ones up to
`max_prefill_tokens` (chunked prefill: one huge prompt never stalls decoding). Requests join and leave
between steps. Blends (and every task in "merged" mode) run alone, on merged weights; so that a steady
stream of other requests cannot starve them, a request that has waited `aging_steps` steps stops the
admission of anything queued after it until it fits.
Prefix holds: a waiting request whose prompt is mostly blocks that a running request is prefilling right now
(same task: a system prompt or prompt format sent by several clients at once) is not admitted to compute them
again; it waits until they are in the prefix cache and takes them from there (what vLLM does in effect). It
keeps its place in the queue and does not stop the admission of others; it waits at most `aging_steps` steps.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..errors import LoraError
from .request import QueueFull, Request, Spec

MODES = ("auto", "merged", "mixed")


class Reuse(NamedTuple):
    """What the KV cache can give a waiting request: prompt tokens its prefix cache holds now, and tokens more of
    it (whole blocks) that running requests are prefilling now and will store."""
    cached: int
    coming: int


class KVCapacity(Protocol):
    """The part of the KV cache the scheduler sees: room for a request, or not; what of its prompt is cached."""

    def allocate(self, request: Request) -> bool: ...

    def free(self, request: Request) -> None: ...

    def reuse(self, request: Request) -> Reuse: ...


@dataclass
class Chunk:
    """Prompt tokens [start, end) of a request, prefilled in this step."""
    request: Request
    start: int
    end: int


@dataclass
class StepPlan:
    """One step: decode rows (one token each) first, then prompt chunks."""
    decode: list[Request] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        return self.decode + [c.request for c in self.chunks]

    @property
    def sampled(self) -> list[Request]:
        """The requests that get a token from this step, in row order: decoders, then finished prompts (but those
        asking for none, max_tokens 0: their prompt's logprobs are all they want)."""
        return self.decode + [c.request for c in self.chunks
                              if c.end == len(c.request.prompt) and c.request.sampling.max_tokens > 0]

    @property
    def specs(self) -> set[Spec]:
        return {r.spec for r in self.requests}

    def only(self, spec: Spec) -> StepPlan:
        """The part of this step that runs `spec` (to retry a failed step one task at a time)."""
        return StepPlan([r for r in self.decode if r.spec == spec], [c for c in self.chunks if c.request.spec == spec])


class Scheduler:
    """The waiting queue (first come, first served, with token and count budgets) and the running set."""

    def __init__(self, kv: KVCapacity, can_mix: Callable[[Spec], bool], *, max_num_seqs: int = 16,
                 max_prefill_tokens: int = 512, max_waiting: int = 1024, max_waiting_tokens: int = 1 << 22,
                 mode: str = "auto", max_loras: int | None = None, aging_steps: int = 32) -> None:
        if mode not in MODES:
            raise LoraError(f"unknown batching mode {mode!r}; use one of {', '.join(MODES)}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_prefill_tokens", max_prefill_tokens),
                            ("max_loras", max_loras or 1), ("aging_steps", aging_steps)):
            if value < 1:
                raise LoraError(f"{name} must be at least 1, got {value}")
        for name, value in (("max_waiting", max_waiting), ("max_waiting_tokens", max_waiting_tokens)):
            if value < 0:
                raise LoraError(f"{name} must be at least 0, got {value}")
        self.kv, self.can_mix, self.mode = kv, can_mix, mode
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self.max_loras, self.aging_steps = max_loras, aging_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in queue order (prompt chunks are laid out first come, first served)
        self._order = itertools.count()
        self.waiting_tokens = 0
        self.steps = 0

    def add(self, request: Request, budget: bool = True) -> None:
        """Queue a request, or raise QueueFull when a waiting budget (requests, prompt tokens) is spent.

        budget=False queues it whatever is waiting (a caller that holds all its prompts anyway: generate)."""
        if budget and len(request.prompt) > self.max_waiting_tokens:  # it would never fit: not worth a retry
            raise LoraError(f"the prompt's {len(request.prompt)} tokens are over the {self.max_waiting_tokens} prompt "
                            "tokens this engine queues (max_waiting_tokens); shorten the prompt")
        if budget and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already; try again shortly")
        if budget and self.waiting_tokens + len(request.prompt) > self.max_waiting_tokens:
            raise QueueFull(f"{self.waiting_tokens} prompt tokens are waiting already, the most this engine queues "
                            f"is {self.max_waiting_tokens}; try again shortly")
        if self.max_loras is not None and len(request.task_names) > self.max_loras:
            raise LoraError(f"the request blends {len(request.task_names)} tasks, over this engine's max_loras of "
                            f"{self.max_loras}; blend fewer tasks")
        request.arrival, request.order = self.steps, next(self._order)
        self.waiting.append(request)
        self.waiting_tokens += len(request.prompt)

    def requests(self) -> list[Request]:
        return [*self.waiting, *self.running]

    def clear(self) -> list[Request]:
        """Empty both queues (the engine stopped); returns what was in them."""
        requests = self.requests()
        for request in self.running:
            self.kv.free(request)
        self.waiting, self.running, self.waiting_tokens = deque(), [], 0
        return requests

    def release(self) -> None:
        """Finished requests leave the queues; their KV capacity is free for the next admission."""
        if any(r.done.is_set() for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.done.is_set())
            self.waiting_tokens = sum(len(r.prompt) for r in self.waiting)
        for request in self.running:
            if request.done.is_set():
                self.kv.free(request)
        self.running = [r for r in self.running if not r.done.is_set()]

    def schedule(self) -> StepPlan:
        """Admit what fits, then lay out the step: every decoder's next token, then prompt chunks."""
        self.steps += 1
        self._admit()
        plan = StepPlan([r for r in self.running if r.decoding])
        budget = self.max_prefill_tokens
        for request in self.running:
            if not request.decoding and budget > 0:
                end = min(len(request.prompt), request.computed + budget)
                plan.chunks.append(Chunk(request, request.computed, end))
                budget -= end - request.computed
        return plan

    def _admit(self) -> None:
        for request in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            if not self._may_join(request):
                if self.steps - request.arrival >= self.aging_steps:
                    break  # it has waited long enough: the running set drains until it fits
                continue
            if self._holds(request):
                continue
            if not self.kv.allocate(request):
                break
            self.waiting.remove(request)
            self.waiting_tokens -= len(request.prompt)
            bisect.insort(self.running, request, key=lambda r: r.order)  # before those admitted while it was held

    def _holds(self, request: Request) -> bool:
        """Whether the request waits for blocks a running request is prefilling: when they are at least half of what
        it would compute. Computing them again costs about as long as waiting (it would run behind that request in
        the step's prefill budget, and a step's cost grows with its tokens), and slows every other request."""
        if request.held >= self.aging_steps:
            return False
        reuse = self.kv.reuse(request)
        if 2 * reuse.coming < len(request.prompt) - reuse.cached:
            return False
        request.held += 1
        return True

    def _may_join(self, request: Request) -> bool:
        """Blends, and every task in "merged" mode, run alone; max_loras bounds the tasks of one step."""
        specs = {r.spec for r in self.running}
        if specs and specs != {request.spec}:
            if self.mode == "merged" or not self.can_mix(request.spec) or not all(map(self.can_mix, specs)):
                return False
        if self.max_loras is not None:
            names = {name for r in self.running for name in r.task_names} | set(request.task_names)
            return len(names) <= self.max_loras
        return True
