"""The engine client: one HTTP request's engine requests, and their Outputs handed to the event loop.

Requests go in as token ids with their SamplingParams (a waiting request holds its ids, never its body);
each Output comes back from the engine thread into its Job's asyncio queue through the app's Mailbox: one
wakeup of the event loop per engine step (its Outputs for every request together), not one per Output.
Engine errors become HTTP errors here: QueueFull 429, EngineDead 503, a bad request 400.
"""
import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NamedTuple

from fastapi import Request

from ..engine import EngineDead, Output, QueueFull, SamplingParams
from ..errors import LoraError
from ..logprobs import TokenLogprobs
from .metrics import Metrics
from .models import ServedModels
from .protocol import APIError


class TokenTime(NamedTuple):
    """When a choice last got new tokens, and how many it had then."""
    at: float
    tokens: int


class Mailbox:
    """Outputs from the engine thread to the event loop, handed over in batches: the first Output since the loop
    last emptied the box wakes it (`call_soon_threadsafe`), those that follow in the same step ride along."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """queue.put_nowait(item) on the event loop, soon; called from the engine thread, so it stays tiny."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a wakeup is on its way already
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def dead_error(error: BaseException | None = None) -> APIError:
    return APIError(503, f"the engine has stopped ({error or 'see the server log'}); the server must be restarted",
                    type="server_error", code="engine_dead")


def engine_error(models: ServedModels, task: str | None, error: BaseException, status: int = 500) -> APIError:
    """The APIError for a request the engine refused (400), could not queue (429), or failed (500, 503)."""
    if isinstance(error, EngineDead):
        return dead_error(error)
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after))
        return APIError(429, f"the server is busy ({error}); retry in {retry} s", type="server_error",
                        code="queue_full", headers={"Retry-After": str(retry)})
    if task is not None and task not in models.mt.downstreams:
        return APIError(404, f"The model `{task}` was unloaded before this request finished.",
                        param="model", code="model_not_found")
    if isinstance(error, LoraError):
        return models.error(status if status != 500 else 400, error)
    models.error(500, error)  # logged in full
    return APIError(500, f"generation failed: {type(error).__name__}; see the server log", type="server_error")


class Job:
    """One HTTP request's engine requests (its prompts, n samples each) and their Outputs as they arrive.

    Choice i*n + j is sample j of prompt i, as OpenAI orders them. Outputs are pushed from the engine
    thread; `abort` cancels whatever has not finished (the client went away).
    """

    def __init__(self, engine: Any, models: ServedModels, metrics: Metrics, mailbox: Mailbox, task: str | None,
                 arrived: float) -> None:
        self.engine, self.models, self.metrics, self.mailbox = engine, models, metrics, mailbox
        self.task, self.label, self.arrived = task, task or models.name, arrived
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.prompt_tokens = 0
        self.last: dict[int, Output] = {}
        self.logprobs: dict[int, list[TokenLogprobs]] = {}  # each choice's tokens' logprobs so far, when asked
        self.prompt_logprobs: dict[int, list[TokenLogprobs]] = {}  # each choice's prompt logprobs, when asked
        self.token_times: dict[int, TokenTime] = {}

    def submit(self, ids: list[int], sampling: list[SamplingParams]) -> None:
        """One engine request per SamplingParams, all on the prompt `ids`."""
        self.prompt_tokens += len(ids)
        for params in sampling:
            index = len(self.request_ids)
            try:
                self.request_ids.append(self.engine.add_request(ids, self.task, params, partial(self._push, index)))
            except LoraError as e:  # queue full, engine dead, the task unloaded meanwhile, an engine limit
                self.abort()
                raise engine_error(self.models, self.task, e, status=400) from None

    def _push(self, index: int, output: Output) -> None:  # on the engine thread
        self.mailbox.put(self.queue, (index, output))

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, Output) as they come, until every choice has finished."""
        remaining = len(self.request_ids)
        while remaining:
            index, out = await self.queue.get()
            self._observe(index, out)
            self.last[index] = out
            if out.logprobs is not None:
                self.logprobs.setdefault(index, []).extend(out.logprobs)
            if out.prompt_logprobs is not None:
                self.prompt_logprobs[index] = out.prompt_logprobs
            if out.finished:
                remaining -= 1
                if out.finish_reason == "error":
                    self.abort()
                    raise engine_error(self.models, self.task, out.error or RuntimeError("unknown error"))
            yield index, out

    async def wait(self, request: Request) -> list[Output]:
        """Every choice's final Output; if the client disconnects first, abort and raise."""
        async def collect() -> list[Output]:
            async for _ in self.outputs():
                pass
            return [self.last[i] for i in range(len(self.request_ids))]
        done = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                self.abort()
        if not done.done():
            raise APIError(499, "the client closed the request", code="client_closed_request")
        return done.result()

    def abort(self) -> None:
        for index, request_id in enumerate(self.request_ids):
            if not (index in self.last and self.last[index].finished):
                self.engine.abort(request_id)

    def _observe(self, index: int, out: Output) -> None:
        m, now, tokens = self.metrics, time.monotonic(), out.num_tokens
        previous = self.token_times.get(index)
        if tokens and previous is None:
            m.ttft.labels(self.label).observe(now - self.arrived)
        elif previous is not None and tokens > previous.tokens:
            new = tokens - previous.tokens  # tokens that showed no text yet arrive together: share the gap
            for _ in range(new):
                m.itl.labels(self.label).observe((now - previous.at) / new)
        if tokens and (previous is None or tokens > previous.tokens):
            self.token_times[index] = TokenTime(now, tokens)
        if out.finished:
            m.e2e.labels(self.label).observe(now - self.arrived)
            m.finish(self.label, out.finish_reason or "error")

    def usage(self, outputs: list[Output] | None = None) -> dict[str, int]:
        completion = sum(out.num_tokens for out in (outputs or self.last.values()))
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


async def disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read before this is called)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
