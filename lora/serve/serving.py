"""What every generating endpoint shares: prompts tokenized off the event loop, engine jobs, server-sent events.

One `Serving` per app, on `app.state.serving`; completions.py, chat.py and generate.py build on it.
"""
import asyncio
import concurrent.futures
import copy
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse

from ..errors import LoraError
from ..prompts import prompt_ids
from ..structured import Grammar, guide, request_constraint
from .engine_client import Job, Mailbox, dead_error, engine_error
from .limits import Limits, seeded
from .metrics import Metrics
from .models import ServedModels
from .protocol import APIError, Sampling

log = logging.getLogger("lora.serve")
LONG_PROMPT_CHARS = 1 << 16  # longer prompts are tokenized in a thread of their own (see Serving.__init__)
T = TypeVar("T")


class Serving:
    """The engine, the served models, the limits and the metrics, and the work every endpoint does with them."""

    def __init__(self, mt: Any, engine: Any, models: ServedModels, limits: Limits) -> None:
        self.mt, self.engine, self.models, self.limits = mt, engine, models, limits
        self.metrics = Metrics(engine)
        models.on_unload.append(self.metrics.forget)
        tokenizer = mt.tokenizer
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_ids = [] if start is None else [start]  # what an empty prompt becomes, as OpenAI's models see it
        # Prompts are tokenized in worker threads, long ones (up to seconds of CPU each) in a thread of their
        # own so they queue behind each other, never in front of short ones. HF tokenizers are not safe to
        # share across threads: each thread gets its own copy, made when the thread starts (a copy takes about
        # 0.3 s of CPU: made during a burst of requests, it would stall the engine's steps).
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-prompts",
                                                           initializer=self._copy_tokenizer)
        self._long_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-long-prompts",
                                                                initializer=self._copy_tokenizer)
        self._mailbox: Mailbox | None = None  # made on the event loop, at the first request
        # binding the tokenizer to llguidance takes about a second: done now, off the event loop, so neither the
        # first structured request nor the first logprobs shaped (token bytes) waits for it. Each submit while
        # no thread is idle starts one: these start every worker thread now.
        self._pool.submit(guide, tokenizer)
        self._pool.submit(int)
        self._long_pool.submit(int)

    def close(self) -> None:
        for pool in (self._pool, self._long_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def check_alive(self) -> None:
        """503 at once once the engine thread has stopped: nothing sent to it could ever be answered."""
        if self.engine.dead is not None:
            raise dead_error(self.engine.dead)

    async def off_loop(self, fn: Callable[..., T], *args: Any, chars: int = 0, **kwargs: Any) -> T:
        """fn(*args, **kwargs) in a worker thread; `chars`: the text it tokenizes, which picks the pool."""
        pool = self._long_pool if chars > LONG_PROMPT_CHARS else self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    def _copy_tokenizer(self) -> None:
        try:
            self._tokenizer()
        except Exception:  # noqa: BLE001 - a failed initializer breaks the pool; the copy is retried at first use
            log.exception("copying the tokenizer for a worker thread failed")

    def _tokenizer(self) -> Any:
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.mt.tokenizer)
        return self._local.tokenizer

    def _prompt_ids(self, task: str | None, how: dict[str, Any]) -> list[int]:
        """A request's prompt ids, rendered as the task's training data was (lora.prompts); runs in a worker
        thread. An empty prompt starts from the model's start token, as OpenAI's do."""
        try:
            meta = None if task is None else self.mt.task_meta(task)
        except LoraError as e:  # unloaded meanwhile, or its files changed since it was loaded
            raise engine_error(self.models, task, e, status=400) from None
        try:
            ids = prompt_ids(self._tokenizer(), meta, **how)
        except LoraError as e:
            raise self.models.error(400, e, param="messages" if "messages" in how else "prompt") from None
        return ids or list(self.start_ids)

    async def prompts(self, task: str | None, hows: list[dict[str, Any]], chars: int) -> list[list[int]]:
        """The prompt ids of each `how` (prompt_ids' keyword arguments), tokenized in a worker thread."""
        self.check_alive()
        return await self.off_loop(lambda: [self._prompt_ids(task, how) for how in hows], chars=chars)

    async def grammar(self, task: str | None, body: Sampling) -> Grammar | None:
        """The request's structured-output constraint (else the task's response_schema) compiled in a worker
        thread (cached per schema); None when unconstrained. 400 naming the field when it cannot be compiled."""
        fields = body.constraint_fields()
        param = next(iter(fields), None)
        try:
            schema = None if task is None else self.mt.response_schema(task)
        except LoraError as e:  # unloaded meanwhile
            raise engine_error(self.models, task, e, status=400) from None
        try:
            constraint = request_constraint(fields, schema)
            if constraint is None:
                return None
            return await self.off_loop(lambda: guide(self.mt.tokenizer).compile(constraint))
        except LoraError as e:
            raise APIError(400, str(e), param=param, code="invalid_structured_output") from None

    def submit(self, task: str | None, prompts: list[list[int]], body: Sampling, arrived: float, *, n: int = 1,
               max_tokens: int | None = None, default_max_tokens: int | None = None,
               param: str = "max_tokens", extra: dict[str, Any] | None = None) -> Job:
        """A Job running every prompt (token ids) n times with the body's sampling fields (and `extra`
        SamplingParams fields: grammar, logprobs, prompt_logprobs)."""
        self.check_alive()
        sampling = [self.limits.sampling(body, self.limits.max_tokens_for(max_tokens, len(ids), default_max_tokens,
                                                                          param), param, extra) for ids in prompts]
        if self._mailbox is None or self._mailbox.loop is not asyncio.get_running_loop():
            self._mailbox = Mailbox(asyncio.get_running_loop())
        job = Job(self.engine, self.models, self.metrics, self._mailbox, task, arrived)
        for ids, params in zip(prompts, sampling):  # checked them all first: nothing runs for a refused request
            job.submit(ids, [seeded(params, j) for j in range(n)])
        return job

    def sse(self, job: Job, head: dict[str, Any], chunks: AsyncIterator[dict[str, Any]],
            include_usage: bool) -> StreamingResponse:
        """A streamed answer as server-sent events: the chunks, usage if asked for, then [DONE]."""
        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': job.usage()})}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                job.abort()  # a client that went away stops costing engine steps
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
