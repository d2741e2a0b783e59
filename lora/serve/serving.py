"""What the routes hand off to: one `Serving` object per app, kept on `app.state.serving`.

It owns the engine client (requests go in as token ids with their SamplingParams; each request's
Outputs come back from the engine thread through `loop.call_soon_threadsafe` into an asyncio queue),
the view of MultiTaskModel's task registry, prompt building (tokenized in worker threads, never on
the event loop), adapter loading under --adapter-root, and the Prometheus metrics.
"""
import asyncio
import concurrent.futures
import copy
import dataclasses
import json
import math
import os
import threading
import time
import uuid
from functools import partial

from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..checkpoint import read_adapter
from ..engine import QueueFull, SamplingParams
from ..errors import LoraError
from ..files import OutsideRootError
from ..prompts import prompt_ids
from .protocol import APIError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
GENERATE_DEFAULT_MAX_TOKENS = 256  # generate_response's
LONG_PROMPT_CHARS = 1 << 16  # longer prompts are tokenized in a thread of their own (see Serving.__init__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (an app per test must not collide).

    Engine state (running, waiting, KV cache, token totals) is read from `engine.stats()` at scrape
    time; latencies and finished requests are observed here, as the Outputs reach the event loop.
    """

    def __init__(self, engine):
        self.engine, self.registry = engine, CollectorRegistry()
        self.registry.register(self)
        self.ttft = Histogram("lora:time_to_first_token_seconds", "Time from arrival to the first token",
                              ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lora:inter_token_latency_seconds", "Time between two tokens of one request",
                             ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lora:e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("lora:request_success", "Finished requests", ["task", "finished_reason"],
                                registry=self.registry)

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("lora:num_requests_running", "Requests in the running batch", stats["running"])
        yield GaugeMetricFamily("lora:num_requests_waiting", "Requests waiting to be scheduled", stats["waiting"])
        yield GaugeMetricFamily("lora:kv_cache_usage_perc", "Fraction of the KV cache in use (0-1)",
                                stats["kv_cache_usage"])
        yield CounterMetricFamily("lora:prompt_tokens", "Prompt tokens processed", stats["prompt_tokens_total"])
        yield CounterMetricFamily("lora:generation_tokens", "Tokens generated", stats["generation_tokens_total"])

    def render(self):
        return generate_latest(self.registry)


class Job:
    """One HTTP request's engine requests (its prompts, n samples each) and their Outputs as they arrive.

    Choice i*n + j is sample j of prompt i, as OpenAI orders them. Outputs are pushed from the engine
    thread; `abort` cancels whatever has not finished (the client went away).
    """

    def __init__(self, serving, task, arrived):
        self.serving, self.task, self.label, self.arrived = serving, task, task or serving.model_name, arrived
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.request_ids, self.prompt_tokens, self.last = [], [], {}
        self.token_times = {}

    def submit(self, ids, sampling, n):
        engine = self.serving.engine
        self.prompt_tokens.append(len(ids))
        for j in range(n):
            index = len(self.request_ids)
            # n seeded samples of one prompt differ from each other, and each is reproducible
            seeded = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
            try:
                self.request_ids.append(engine.add_request(ids, self.task, seeded, partial(self._push, index)))
            except QueueFull as e:
                self.abort()
                raise APIError(429, f"the server is busy ({e}); retry in {math.ceil(e.retry_after)} s",
                               type="server_error", code="queue_full",
                               headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
            except LoraError as e:  # the task was unloaded meanwhile, or a limit of the engine's
                self.abort()
                raise self.serving.error_of(self.task, e, status=400) from None

    def _push(self, index, output):  # on the engine thread: keep it tiny
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, output))
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            pass

    async def outputs(self):
        """(choice index, Output) as they come, until every choice has finished."""
        remaining = len(self.request_ids)
        while remaining:
            index, out = await self.queue.get()
            self._observe(index, out)
            self.last[index] = out
            if out.finished:
                remaining -= 1
                if out.finish_reason == "error":
                    self.abort()
                    raise self.serving.error_of(self.task, out.error)
            yield index, out

    async def wait(self, request):
        """Every choice's final Output; if the client disconnects first, abort and raise."""
        async def collect():
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

    def abort(self):
        for index, request_id in enumerate(self.request_ids):
            if not (index in self.last and self.last[index].finished):
                self.serving.engine.abort(request_id)

    def _observe(self, index, out):
        m, now, tokens = self.serving.metrics, time.monotonic(), out.num_tokens
        previous = self.token_times.get(index)  # (when, how many tokens) at the choice's last new tokens
        if tokens and previous is None:
            m.ttft.labels(self.label).observe(now - self.arrived)
        elif previous is not None and tokens > previous[1]:
            new = tokens - previous[1]  # tokens that showed no text yet arrive together: share the gap
            for _ in range(new):
                m.itl.labels(self.label).observe((now - previous[0]) / new)
        if tokens and (previous is None or tokens > previous[1]):
            self.token_times[index] = (now, tokens)
        if out.finished:
            m.e2e.labels(self.label).observe(now - self.arrived)
            m.finished.labels(self.label, out.finish_reason).inc()

    def usage(self, outputs=None):
        prompt = sum(self.prompt_tokens)
        completion = sum(out.num_tokens for out in (outputs or self.last.values()))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def disconnected(request):
    """Returns once the client has gone away (the body was read before this is called)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Stripper:
    """Chat and /v1/generate answers are trimmed as generate_response trims them; streamed, whitespace
    that may turn out to be trailing is held back, so the deltas add up to the trimmed answer."""

    def __init__(self):
        self.sent = {}

    def delta(self, index, out):
        text = out.text.strip()
        sent = self.sent.get(index, "")
        if len(text) <= len(sent) or not text.startswith(sent):
            return ""
        self.sent[index] = text
        return text[len(sent):]


class Serving:
    """The model server behind the routes: registry view, prompts, engine requests, adapters, metrics.

    Args:
        mt: the MultiTaskModel; its registry (`mt.downstreams`, `mt.task_meta`) is the one list of tasks.
        engine: the Engine that owns `mt` (started and stopped by the app's lifespan).
        model_name: the base model's id in /v1/models and in errors.
        adapter_root: the folder /v1/load_lora_adapter may read from (None: loading at run time is off).
        max_tokens_cap: the most tokens one request may ask for.
        max_prompts: the most prompts x n one request may hold.
        context_length: prompt plus completion tokens allowed (None: unchecked here).
    """

    def __init__(self, mt, engine, *, model_name, adapter_root=None, max_tokens_cap=512, max_prompts=16,
                 context_length=None):
        self.mt, self.engine, self.model_name = mt, engine, model_name
        self.adapter_root = None if adapter_root is None else os.path.abspath(adapter_root)
        self.max_tokens_cap, self.max_prompts, self.context_length = max_tokens_cap, max_prompts, context_length
        self.created = int(time.time())
        self.metrics = Metrics(engine)
        tokenizer = mt.tokenizer
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_ids = [] if start is None else [start]  # what an empty prompt becomes, as OpenAI's models see it
        # No token spans more characters than the longest in the vocabulary: see check_text_length.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        # Prompts are tokenized in worker threads, long ones (up to seconds of CPU each) in a thread of their
        # own so they queue behind each other, never in front of short ones. HF tokenizers are not safe to
        # share across threads: each thread gets its own copy.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-prompts")
        self._long_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-long-prompts")
        self._local = threading.local()

    def close(self):
        for pool in (self._pool, self._long_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the task registry, as clients see it

    def task_of(self, model, param="model"):
        """None for the base model, else the task; an unknown name is a 404, as OpenAI answers it."""
        if model == self.model_name:
            return None
        if model not in self.mt.downstreams:
            raise APIError(404, f"The model `{model}` does not exist. Models here: "
                           f"{', '.join(self.model_ids())}", param=param, code="model_not_found")
        return model

    def model_ids(self):
        return [self.model_name, *sorted(self.mt.downstreams)]

    def model_card(self, name):
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lora-pytorch",
                "root": self.model_name, "parent": None if name == self.model_name else self.model_name}

    def list_models(self):
        return {"object": "list", "data": [self.model_card(name) for name in self.model_ids()]}

    def get_model(self, name):
        self.task_of(name)
        return self.model_card(name)

    def error_of(self, task, error, status=500):
        """The APIError for a request the engine refused (400) or failed (500)."""
        if task is not None and task not in self.mt.downstreams:
            return APIError(404, f"The model `{task}` was unloaded before this request finished.",
                            param="model", code="model_not_found")
        if status == 400:
            return APIError(400, str(error))
        return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")

    # ------------------------------------------------------------ prompts, built in worker threads

    async def off_loop(self, fn, *args, chars=0, **kwargs):
        """fn(*args, **kwargs) in a worker thread; `chars`: the text it tokenizes, which picks the pool."""
        pool = self._long_pool if chars > LONG_PROMPT_CHARS else self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    def _tokenizer(self):
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.mt.tokenizer)
        return self._local.tokenizer

    def _prompt_ids(self, task, **how):
        """A request's prompt ids, rendered as the task's training data was (lora.prompts); runs in a worker
        thread. A chat task sees the whole conversation through the chat template, an Alpaca task the last
        user message as its {instruction}. An empty prompt starts from the model's start token, as OpenAI's do."""
        try:
            meta = None if task is None else self.mt.task_meta(task)
        except LoraError as e:  # unloaded meanwhile, or its files changed since it was loaded
            raise self.error_of(task, e, status=400) from None
        try:
            ids = prompt_ids(self._tokenizer(), meta, **how)
        except LoraError as e:
            raise APIError(400, str(e), param="messages" if "messages" in how else "prompt") from None
        return ids or list(self.start_ids)

    # ------------------------------------------------------------ limits

    def check_count(self, prompts, n):
        if prompts * n > self.max_prompts:
            raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} completions, "
                           f"over this server's limit of {self.max_prompts} (--max-prompts); split it into "
                           "smaller requests", param="prompt" if n == 1 else "n", code="too_many_prompts")

    def check_text_length(self, chars, param):
        """Refuse text too long for the context in any tokenization before tokenizing it: a megabyte takes
        seconds of CPU to tokenize. (2x margin for normalizers that drop characters.)"""
        if self.context_length and chars > 2 * self.context_length * self.max_token_chars:
            raise APIError(400, f"the prompt holds {chars:,} characters, more than this model's maximum context length "
                           f"of {self.context_length} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")

    def check_max_tokens(self, requested, param):
        if requested is not None and requested > self.max_tokens_cap:
            raise APIError(400, f"{param} is {requested}, over this server's cap of {self.max_tokens_cap}",
                           param=param, code="max_tokens_exceeded")

    def max_tokens_for(self, requested, prompt_tokens, default, param):
        """The completion's token budget: `requested`, else what fits, within the cap and the context."""
        context = self.context_length
        room = context - prompt_tokens if context else self.max_tokens_cap
        max_tokens = requested or min(default or self.max_tokens_cap, self.max_tokens_cap, max(room, 1))
        if context and prompt_tokens + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                           f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                           f"{max_tokens} for the completion). Please reduce the prompt or the completion length.",
                           param=param if requested else "prompt", code="context_length_exceeded")
        return max_tokens

    def submit(self, task, prompts, body, arrived, *, n=1, max_tokens=None, default_max_tokens=None,
               param="max_tokens"):
        """A Job running every prompt (token ids) n times with the body's sampling fields."""
        limits = [self.max_tokens_for(max_tokens, len(ids), default_max_tokens, param) for ids in prompts]
        job = Job(self, task, arrived)
        for ids, limit in zip(prompts, limits):  # checked them all first: nothing runs for a refused request
            job.submit(ids, SamplingParams(
                max_tokens=limit, temperature=body.temperature or 0.0,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                min_tokens=min(body.min_tokens, limit), stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                seed=body.seed), n)
        return job

    # ------------------------------------------------------------ the endpoints' work

    async def completions(self, body, request):
        arrived = time.monotonic()  # latency metrics count the time spent tokenizing too
        task = self.task_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        self.check_count(len(prompts), body.n)
        self.check_max_tokens(body.max_tokens, "max_tokens")
        for prompt in prompts:
            self.check_text_length(len(prompt), "prompt")
        ids = await self.off_loop(lambda: [self._prompt_ids(task, prompt=p) for p in prompts],
                                  chars=sum(map(len, prompts)))
        job = self.submit(task, ids, body, arrived, n=body.n, max_tokens=body.max_tokens,
                          default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}

        def choice(index, text, finish_reason):
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if body.stream:
            async def chunks():
                async for index, out in job.outputs():
                    if out.delta or out.finished:
                        yield {**head, "choices": [choice(index, out.delta, out.finish_reason)]}
            return self.sse(job, head, chunks(), body.stream_options and body.stream_options.include_usage)
        outs = await job.wait(request)
        return {**head, "choices": [choice(i, out.text, out.finish_reason) for i, out in enumerate(outs)],
                "usage": job.usage(outs)}

    async def chat_completions(self, body, request):
        arrived = time.monotonic()  # latency metrics count the time spent tokenizing too
        task = self.task_of(body.model)
        self.check_count(1, body.n)
        requested, param = (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens \
            else (body.max_tokens, "max_tokens")
        self.check_max_tokens(requested, param)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        self.check_text_length(chars, "messages")
        ids = await self.off_loop(self._prompt_ids, task, messages=messages, chars=chars)
        job = self.submit(task, [ids], body, arrived, n=body.n, max_tokens=requested, param=param)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "object": "chat.completion.chunk" if body.stream else "chat.completion"}
        if body.stream:
            async def chunks():
                strip = Stripper()
                for index in range(body.n):
                    yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}
                async for index, out in job.outputs():
                    delta = strip.delta(index, out)
                    if delta or out.finished:
                        yield {**head, "choices": [{"index": index, "delta": {"content": delta} if delta else {},
                                                    "finish_reason": out.finish_reason}]}
            return self.sse(job, head, chunks(), body.stream_options and body.stream_options.include_usage)
        outs = await job.wait(request)
        return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": out.text.strip()},
                                     "finish_reason": out.finish_reason} for i, out in enumerate(outs)],
                "usage": job.usage(outs)}

    async def generate(self, body, request):
        """The native API: {downstream, instruction, input} in, generate_response's answer out."""
        arrived = time.monotonic()
        task = None if body.downstream is None else self.task_of(body.downstream, param="downstream")
        self.check_max_tokens(body.max_new_tokens, "max_new_tokens")
        chars = len(body.instruction) + len(body.input)
        self.check_text_length(chars, "instruction")
        ids = await self.off_loop(self._prompt_ids, task, instruction=body.instruction, input=body.input, chars=chars)
        job = self.submit(task, [ids], body, arrived, max_tokens=body.max_new_tokens,
                          default_max_tokens=GENERATE_DEFAULT_MAX_TOKENS, param="max_new_tokens")
        (out,) = await job.wait(request)
        return {"downstream": body.downstream, "response": out.text.strip(), "finish_reason": out.finish_reason,
                "usage": job.usage([out])}

    def sse(self, job, head, chunks, include_usage):
        """A streamed answer as server-sent events: the chunks, usage if asked for, then [DONE]."""
        async def events():
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

    # ------------------------------------------------------------ adapters at run time (vLLM's endpoints)

    def _path_in_root(self, path):
        """`path` (a relative one starts at the root) if it names something inside the adapter root, on paper;
        links are checked where it matters, as each file is opened (read_adapter with root)."""
        if self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root",
                           param="lora_path", code="adapter_loading_disabled", type="permission_error")
        if "\0" in path:
            raise APIError(400, "lora_path holds a NUL byte", param="lora_path")
        full = os.path.normpath(os.path.join(self.adapter_root, path))  # an absolute `path` replaces the root here
        if os.path.commonpath([self.adapter_root, full]) != self.adapter_root:
            raise APIError(403, f"lora_path {path} is not inside the adapter root {self.adapter_root}",
                           param="lora_path", code="path_not_allowed", type="permission_error")
        return full

    async def load_adapter(self, body):
        name = body.lora_name
        path = self._path_in_root(body.lora_path)
        if name == self.model_name:
            raise APIError(400, f"`{name}` is the base model's name", param="lora_name")
        if name in self.mt.downstreams:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")

        def register():  # on the engine thread, between two steps
            if name in self.mt.downstreams:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            # With root, every read of the checkpoint (now, and again after cache eviction) opens each file
            # below the root without following links: what is checked is what is read.
            self.mt.add_downstream(name, path, root=self.adapter_root)
            try:
                self.mt.adapter(name)  # checked against the base model now, not at its first request
            except BaseException:
                self.mt.remove_downstream(name)
                raise
        try:
            # First a full check in a worker thread, so a bad or slow checkpoint never holds up the engine's steps.
            await self.off_loop(read_adapter, path, root=self.adapter_root)
            await asyncio.wrap_future(self.engine.call(register))
        except OutsideRootError as e:
            raise APIError(403, str(e), param="lora_path", code="path_not_allowed", type="permission_error") from None
        except LoraError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, body):
        name = body.lora_name

        def unregister():
            if name not in self.mt.downstreams:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            self.mt.remove_downstream(name)
        await asyncio.wrap_future(self.engine.call(unregister))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
