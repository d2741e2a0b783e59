"""The engine: its public API (add_request, abort, call, generate, stats) and the loop that steps it.

Continuous batching: one thread owns the model and runs one forward per step over every running request.
A step runs queued calls (adapter loads and unloads), drops aborted requests and those of unloaded tasks,
asks the scheduler for a plan, has the runner run it, and hands each request its Output. No exception in
a step stops the engine: it fails only the requests it concerns. If the thread stops anyway, `dead` is set,
every request gets a finished error Output (EngineDead) and add_request raises EngineDead.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import LoraError
from ..logprobs import TokenLogprobs
from ..models import context_length
from .kv_cache import SlotCache, kv_bytes_per_token
from .output import OutputProcessor, eos_ids
from .packed import can_prepack
from .prefix_cache import PrefixCache
from .request import EngineDead, Output, Request, SamplingParams
from .runner import ModelRunner, Tasks
from .sampler import seed_generator
from .scheduler import Scheduler

log = logging.getLogger("lora.engine")
_ids = itertools.count()
PREFIX_CACHE_BYTES = 512 << 20


class Engine:
    """Continuous batching over a tasks object (MultiTaskModel): the one place that runs the model to generate.

    Args:
        tasks: the base model and task adapters that serve the requests (see runner.Tasks).
        max_num_seqs: requests running at once (KV-cache slots).
        max_model_len: prompt plus answer tokens per request (default: the model's context, at most 4096).
        kv_cache_bytes: memory for the KV cache; fewer slots than max_num_seqs if it cannot hold them.
        max_prefill_tokens: prompt tokens prefilled per step (chunked prefill).
        max_waiting, max_waiting_tokens: requests, and prompt tokens, that may wait; beyond, QueueFull.
        mode: "auto" (merged weights when a step has one task, else per-token updates), "merged" (one task
            at a time, others wait) or "mixed" (always per-token updates).
        merge_after: steps of one task before "auto" goes back to merged weights.
        max_loras: distinct tasks in one step (default: no limit beyond the slots).
        aging_steps: steps a request that must run alone may wait before it stops later ones from joining.
        enable_prefix_caching: a request reuses the K/V of the longest prefix of its prompt that an earlier or
            running request of its task computed (whole blocks; see engine.prefix_cache).
        block_size: tokens per prefix-cache block.
        prefix_cache_bytes: memory for the prefix cache's blocks (default 512 MiB; allocated as blocks are written).
        enforce_eager: False compiles decode steps with torch.compile in a background thread while eager steps
            serve (see engine.compiled; minutes of CPU on a small machine, so a library engine is eager unless
            asked; `lora serve` compiles unless --enforce-eager).
        compile_backend: torch.compile's backend ("eager": the graph capture alone, no code generation).
        prepack_weights: eager decode steps of several sequences run every linear layer on a copy of its weight
            prepacked for oneDNN (1.3-1.6x per step on a CPU; one more copy of the linear weights in memory), and
            steps of one sequence split each layer's rows across torch's threads (see engine.packed). Default: on
            for float32 on a CPU.
    """

    def __init__(self, tasks: Tasks, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 kv_cache_bytes: float | None = None, max_prefill_tokens: int = 512, max_waiting: int = 1024,
                 mode: str = "auto", merge_after: int = 8, max_waiting_tokens: int = 1 << 22,
                 max_loras: int | None = None, aging_steps: int = 32, enable_prefix_caching: bool = True,
                 enforce_eager: bool = True, compile_backend: str = "inductor", block_size: int = 16,
                 prefix_cache_bytes: float = PREFIX_CACHE_BYTES, prepack_weights: bool | None = None) -> None:
        self.tasks, self.model, self.tokenizer = tasks, tasks.pretrained_model, tasks.tokenizer
        context = context_length(self.model.config)
        self.max_model_len = max_model_len or min(context, 4096)
        if self.max_model_len > context:
            raise LoraError(f"max_model_len {self.max_model_len} is over the model's context of {context} tokens")
        per_slot = self.max_model_len * kv_bytes_per_token(self.model.config, tasks.dtype)
        slots = max_num_seqs if kv_cache_bytes is None else min(max_num_seqs, int(kv_cache_bytes // per_slot))
        if slots < 1:
            raise LoraError(f"the KV cache budget of {kv_cache_bytes} bytes holds no sequence of {self.max_model_len} "
                            f"tokens ({per_slot} bytes); raise the budget or lower max_model_len")
        if block_size < 1:
            raise LoraError(f"block_size must be at least 1, got {block_size}")
        block_bytes = block_size * kv_bytes_per_token(self.model.config, tasks.dtype)
        if enable_prefix_caching and prefix_cache_bytes < block_bytes:
            raise LoraError(f"the prefix cache of {prefix_cache_bytes} bytes holds no block of {block_size} tokens "
                            f"({block_bytes} bytes); raise prefix_cache_bytes, or turn prefix caching off")
        prefix = PrefixCache(block_size, int(prefix_cache_bytes // block_bytes)) if enable_prefix_caching else None
        self.cache = SlotCache(slots, self.max_model_len, prefix)
        self.scheduler = Scheduler(self.cache, tasks.can_mix, max_num_seqs=slots, max_prefill_tokens=max_prefill_tokens,
                                   max_waiting=max_waiting, max_waiting_tokens=max_waiting_tokens, mode=mode,
                                   max_loras=max_loras, aging_steps=aging_steps)
        self.max_num_seqs, self.max_loras = max_num_seqs, max_loras or slots
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        eos = eos_ids(self.model, self.tokenizer)
        self.runner = ModelRunner(tasks, self.cache, eos, max_tokens=slots + max_prefill_tokens, mode=mode,
                                  merge_after=merge_after, max_loras=self.max_loras, enforce_eager=enforce_eager,
                                  compile_backend=compile_backend, prepack_weights=prepack_weights is not False
                                  and can_prepack(tasks.device, tasks.dtype))
        self.outputs = OutputProcessor(self.tokenizer, eos)
        self.dead: BaseException | None = None
        self._cond = threading.Condition()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._aborts: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = self._abort_all = False
        self._registrations: tuple[int, ...] = ()  # the tasks as the last step saw them (see _drop_gone)
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "steps_total": 0}

    # ------------------------------------------------------------------ the API other threads call

    def add_request(self, prompt_ids: Iterable[int], task: Any, sampling: SamplingParams,
                    on_output: Callable[[Output], None] | None = None, request_id: str | None = None) -> str:
        """Queue one request; returns its id. Thread-safe. Raises LoraError for a bad request, QueueFull, EngineDead."""
        request = self._request(prompt_ids, task, sampling, on_output, request_id)
        with self._cond:
            self._check_alive()
            self.scheduler.add(request)
            self._cond.notify()
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); it gets a finished "abort" Output at the next step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run fn() on the engine's thread between two steps (adapter load/unload); returns a Future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self.dead is not None:
                future.set_exception(self.dead)
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        if self._thread is None:
            self._run_calls()
        return future

    @property
    def started(self) -> bool:
        """Whether a background thread steps the engine (`start`); otherwise callers of `generate` step it."""
        return self._thread is not None

    def start(self) -> None:
        """Step in a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish every queued and running request, then stop the thread; after `timeout` seconds abort them."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self._abort_all = True
                self._cond.notify()
            thread.join()
        self._thread = None

    def generate(self, prompts: list[list[int]], tasks: list[Any],
                 sampling: SamplingParams | list[SamplingParams]) -> list[Output]:
        """Answer many prompts (token ids) for their tasks; blocks until done. One Output per prompt, in order,
        covering its whole answer: its delta is the whole text and its new_token_ids every token."""
        settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        requests = [self._request(p, t, s, None, None) for p, t, s in zip(prompts, tasks, settings)]
        with self._cond:
            self._check_alive()
            for request in requests:
                self.scheduler.add(request, budget=False)  # the caller holds these prompts anyway
            self._cond.notify()
        for request in requests:
            while not request.done.is_set():
                if self._thread is None:
                    self.step()
                else:
                    request.done.wait()
        return [dataclasses.replace(r.output, delta=r.output.text, new_token_ids=list(r.tokens),
                                    logprobs=None if r.sampling.logprobs is None else list(r.logprobs),
                                    prompt_logprobs=None if r.sampling.prompt_logprobs is None else r.prompt_logprobs)
                for r in requests if r.output is not None]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        used = sum(len(r.prompt) + len(r.tokens) for r in running)
        compiled = self.runner.compiled
        return {"running": len(running), "waiting": len(waiting), "kv_cache_usage": self.cache.usage(used),
                **self.counters, "running_lora_adapters": sorted({n for r in running for n in r.task_names}),
                "waiting_lora_adapters": sorted({n for r in waiting for n in r.task_names}),
                "max_lora": self.max_loras, "prefix_cache_queries": self.cache.prefix_queries,
                "prefix_cache_hits": self.cache.prefix_hits, "prefix_cache_usage": self.cache.prefix_usage(),
                "prepacked_steps_total": self.runner.packed.steps if self.runner.packed is not None else 0,
                "split_row_steps_total": self.runner.packed.split_steps if self.runner.packed is not None else 0,
                "lean_steps_total": self.runner.lean.steps,  # see engine.lean
                "compiled_decode": "off" if compiled is None else compiled.state,  # see engine.compiled
                "compiled_steps_total": 0 if compiled is None else compiled.steps}

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """One iteration: calls, aborts, admission, forward, outputs. Returns False when there was nothing to do."""
        self._run_calls()
        try:
            with self._cond:
                self._drop_gone()
                plan = self.scheduler.schedule()
        except Exception as e:  # noqa: BLE001 - a bug in planning: what was queued fails, the engine goes on
            log.exception("planning a step failed")
            with self._cond:
                for request in self.scheduler.requests():
                    self._finish(request, "error", e)
                self.scheduler.release()
            return True
        if not plan.requests:
            return False
        try:
            results = self.runner.execute(plan)
        except Exception as e:  # noqa: BLE001 - the runner fails tasks one by one; this is anything else
            results = {r: e for r in plan.requests}
        self.counters["steps_total"] += 1
        for chunk in plan.chunks:
            if not isinstance(results.get(chunk.request), BaseException):
                chunk.request.computed = chunk.end
                self.cache.keep(chunk.request)
                self.counters["prompt_tokens_total"] += chunk.end - chunk.start
        for request, result in results.items():
            if isinstance(result, BaseException):
                self.cache.scrub(request)
                self._finish(request, "error", result)
                continue
            request.prompt_logprobs += result.prompt_logprobs
            if result.token is not None:
                self.counters["generation_tokens_total"] += 1
                self._append(request, result.token, result.logprobs)
            elif request.decoding:  # max_tokens 0: its prompt's log-probabilities were all it asked for
                self._finish(request, "length")
        with self._cond:
            self.scheduler.release()
        return True

    def _request(self, prompt_ids: Iterable[int], task: Any, sampling: SamplingParams,
                 on_output: Callable[[Output], None] | None, request_id: str | None) -> Request:
        sampling.check()
        spec = self.tasks.normalize(task)
        try:
            prompt = np.asarray(list(prompt_ids))
        except (TypeError, ValueError, OverflowError):
            prompt = np.asarray([0.5])  # refused just below
        if prompt.size == 0:
            raise LoraError("the prompt is empty; send at least one token of text")
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer) or prompt.min() < 0 \
                or prompt.max() >= self.vocab_size:
            raise LoraError(f"the prompt must be a list of token ids from 0 to {self.vocab_size - 1}")
        if len(prompt) + sampling.max_tokens > self.max_model_len:
            raise LoraError(f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                            f"{len(prompt) + sampling.max_tokens} ({len(prompt)} in the prompt, "
                            f"{sampling.max_tokens} to generate): shorten the prompt or lower max_tokens")
        generator = None if sampling.seed is None else seed_generator(sampling.seed, self.tasks.device)
        matcher = None if sampling.grammar is None else sampling.grammar.matcher()
        return Request(request_id or f"req-{next(_ids)}", prompt.astype(np.int32), spec, sampling, on_output,
                       generator, matcher)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDead(str(self.dead)) from self.dead

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        if calls:  # adapter loads and unloads: a task's name may now mean other weights
            self._forget_tasks()
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(e)

    def _forget_tasks(self) -> None:
        """A task name may now mean other weights: drop what was computed with the old ones."""
        self.cache.forget()
        self.runner.forget_tasks()

    def _drop_gone(self) -> None:
        """Aborted requests, and those whose task was unloaded, finish before the step is planned."""
        aborts, self._aborts = self._aborts, set()
        registrations = self.tasks.registrations
        if registrations != self._registrations:  # registered or removed outside call(): cached K/V may be stale
            self._forget_tasks()
            self._registrations = registrations
        known = set(self.tasks.downstreams)
        for request in self.scheduler.requests():
            if request.request_id in aborts or self._abort_all:
                self._finish(request, "abort")
            elif any(name not in known for name in request.task_names):
                gone = next(name for name in request.task_names if name not in known)
                self._finish(request, "error", LoraError(f"task {gone!r} was unloaded"))
        self.scheduler.release()

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        if request.matcher is not None:
            try:
                request.matcher.advance(token)
            except LoraError as e:  # only a token sampled without its mask can break the grammar: it alone fails
                self._finish(request, "error", e)
                return
        if logprobs is not None:
            request.logprobs.append(logprobs)
        try:
            output = self.outputs.append(request, token)
            if not output.finished and request.matcher is not None and request.matcher.is_finished():
                output = self.outputs.finish(request, "stop", [token])  # the grammar's answer is complete
        except Exception as e:  # noqa: BLE001 - detokenizing this answer failed: it alone fails
            output = self.outputs.fail(request, "error", LoraError(f"decoding the answer failed: {e}"))
        self._emit(request, output)

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        if request.done.is_set():
            return
        try:
            output = self.outputs.finish(request, reason, error=error)
        except Exception as e:  # noqa: BLE001 - the request still finishes, with what was sent
            output = self.outputs.fail(request, reason, error or LoraError(f"decoding the answer failed: {e}"))
        self._emit(request, output)

    def _emit(self, request: Request, output: Output) -> None:
        """Hand the request its Output; a callback that raises fails its own request only."""
        if request.on_output is None:
            return
        try:
            request.on_output(output)
        except Exception as e:  # noqa: BLE001 - the caller's code, not the engine's
            log.exception("the output callback of request %s raised", request.request_id)
            if not output.finished:
                final = self.outputs.fail(request, "error", LoraError(
                    f"the request's output callback raised {type(e).__name__}: {e}"))
                try:
                    request.on_output(final)
                except Exception:  # noqa: BLE001 - logged above; nothing else to tell it
                    pass

    def _has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._calls)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._has_work() or self._stopping):
                        self._cond.wait()
                    if self._stopping and not self._has_work():
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - the thread is ending: nobody may wait on it forever
            self._die(e)

    def _die(self, cause: BaseException) -> None:
        log.error("the engine thread stopped", exc_info=cause)
        dead = EngineDead(f"the engine stopped ({type(cause).__name__}: {cause}); restart the server")
        dead.__cause__ = cause
        with self._cond:
            self.dead = dead
            requests = self.scheduler.clear()
            calls, self._calls = self._calls, []
        for request in requests:
            if not request.done.is_set():
                self._emit(request, self.outputs.fail(request, "error", dead))
        for _, future in calls:
            future.set_exception(dead)

