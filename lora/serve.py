"""`lora serve`: one base model and its task adapters behind the OpenAI HTTP API.

A request's `model` is a task name (or the base model's). Requests wait in one queue for up to
`batch_wait_ms`; one worker thread, the only code that touches the model, then runs them as batches
the adaptive policy chooses (`plan_batches`: merged weights for a dominant task, unmerged mixed-task
batches when tasks are spread), and a streamer hands each request the tokens of its own rows. Loading
and unloading adapters goes through the same queue, so it happens between batches, never during one.
"""
import asyncio
import concurrent.futures
import contextlib
import copy
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Optional, Union

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .data import encode_prompt, format_prompt
from .errors import LoraError
from .multitask import DEFAULT_PROMPT_FORMAT, GENERATION_DEFAULTS, plan_batches

log = logging.getLogger("lora.serve")
MAX_BODY_BYTES = 1 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
UNION_TAGS = {"str", "int", "float", "bool", "none"}


# ---------------------------------------------------------------- errors in OpenAI's shape

class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(exc):
    """Pydantic's errors as one OpenAI error: 400 for a body that is not JSON, 422 for wrong fields."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    # loc is ("body", field, index, field, ...), with union member tags ("str", "list[str]") mixed in
    fields = [str(p) for p in first["loc"][1:] if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p
                                                                                or p[:1].isupper()))]
    param = ".".join(fields) or None
    return APIError(422, f"{param or 'request body'}: {first['msg']}", param=param, code=first["type"])


# ---------------------------------------------------------------- request bodies

class Body(BaseModel):
    # Strict: "5" is not a number; fields the API defines but this server ignores (user, seed...) pass.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # unset or 0: greedy, as generate_response
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = Field(None, max_length=4)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(Sampling):
    model: str
    prompt: Union[str, list[str]]


class ContentPart(Body):
    type: str
    text: Optional[str] = None


class Message(Body):
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self):
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(Sampling):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name for max_tokens


class GenerateRequest(Body):
    """The native endpoint: the arguments of MultiTaskModel.generate_response."""
    downstream: Optional[str] = None
    instruction: str = ""
    input: str = ""
    max_new_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)


class LoadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)


# ---------------------------------------------------------------- one prompt of a request, as generated

class Row:
    """One prompt: what to generate, and the answer so far, handed to its request as it grows.

    `strip` (chat, /v1/generate) trims the answer as generate_response does; a streamed answer then
    holds back whitespace that may turn out to be trailing, so its deltas add up to the full answer.
    """

    def __init__(self, job, index, task, prompt, prompt_tokens, max_tokens, stop=(), strip=False):
        self.job, self.index, self.task, self.prompt = job, index, task, prompt
        self.prompt_tokens, self.max_tokens, self.stop, self.strip = prompt_tokens, max_tokens, list(stop), strip
        self.hold = max(map(len, self.stop), default=1) - 1  # streamed text that could start a stop string
        self.tokens, self.generated, self.text, self.sent, self.finish_reason = [], 0, "", "", None

    @property
    def done(self):
        return self.finish_reason is not None or self.job.cancelled

    def add(self, token, decode, eos_ids):
        """One new token from the batch (called on the worker thread)."""
        self.generated += 1
        if token in eos_ids:
            return self.finish("stop", decode)
        self.tokens.append(token)
        if not (self.stop or self.job.stream):  # nothing to look at before the end
            return self.finish("length", decode) if self.generated >= self.max_tokens else None
        text = decode(self.tokens)
        cut = min((at for at in map(text.find, self.stop) if at >= 0), default=None)
        if cut is not None:
            return self.finish("stop", decode, text[:cut])
        if self.generated >= self.max_tokens:
            return self.finish("length", decode, text)
        if self.job.stream:
            visible = text.rstrip("\ufffd")  # a character whose bytes are still to come
            self._send(visible[:len(visible) - self.hold])

    def answer(self):
        return self.text.strip() if self.strip else self.text

    def _send(self, text):
        text = text.strip() if self.strip else text
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.push(("delta", self.index, text[len(self.sent):]))
            self.sent = text

    def finish(self, reason, decode, text=None):
        if self.finish_reason is None:
            self.text = decode(self.tokens) if text is None else text
            self.finish_reason = reason
            if self.job.stream:
                self._send(self.answer())
            self.job.push(("done", self.index, reason))

    def fail(self, error):
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.job.push(("error", self.index, error))


class Job:
    """A request's rows plus the way its events reach the handler awaiting them on the event loop."""

    def __init__(self, loop, stream=False, settings=()):
        self.loop, self.stream, self.settings, self.rows, self.cancelled = loop, stream, settings, [], False
        self.arrived = time.monotonic()
        self.events = asyncio.Queue()
        self.head = {}  # id, object, created, model: the fields every response chunk repeats

    def push(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            pass

    async def stream_events(self):
        """("delta", row, text) and ("done", row, finish_reason) until every row is done."""
        remaining = len(self.rows)
        while remaining:
            kind, index, payload = await self.events.get()
            if kind == "error":
                raise payload
            yield kind, index, payload
            if kind == "done":
                remaining -= 1

    async def wait(self):
        async for _ in self.stream_events():
            pass
        return self.rows


class RowStreamer(BaseStreamer):
    """Splits each step's tokens, one per row, among the rows (HF's own streamers take one row only)."""

    def __init__(self, rows, decode, eos_ids):
        self.rows, self.decode, self.eos_ids, self.prompt_seen = rows, decode, eos_ids, False

    def put(self, value):
        if not self.prompt_seen:  # generate puts the prompt ids once, before the first new token
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.tolist()):
            if not row.done:
                row.add(token, self.decode, self.eos_ids)

    def end(self):
        for row in self.rows:
            row.finish("length", self.decode)


class RowsDone(StoppingCriteria):
    """Lets generate stop a row that finished on its own terms: its max_tokens, a stop string, a client gone."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


# ---------------------------------------------------------------- the worker thread

class Worker:
    """The one thread that touches the model: takes queued requests for `batch_wait` seconds (up to
    `max_batch_size` rows), then runs them through the batching policy. Functions queued with `call`
    (adapter loads and unloads) run in queue order, between batches."""

    STOP = object()

    def __init__(self, mt, max_batch_size=16, batch_wait=0.005, mode="auto"):
        self.mt, self.max_batch_size, self.batch_wait, self.mode = mt, max_batch_size, batch_wait, mode
        eos = mt.generation_kwargs({})["eos_token_id"]
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.inbox = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="lora-serve-worker", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Finish everything queued so far, then end the thread."""
        self.inbox.put(self.STOP)
        self.thread.join()

    def submit(self, job):
        self.inbox.put(job)

    async def call(self, fn):
        """fn() on the worker thread, between batches; its result or exception comes back here."""
        future = concurrent.futures.Future()
        self.inbox.put((fn, future))
        return await asyncio.wrap_future(future)

    def _loop(self):
        pending = None
        while True:
            item, pending = pending or self.inbox.get(), None
            if item is self.STOP:
                return
            if isinstance(item, tuple):
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the awaiting request
                    future.set_exception(e)
                continue
            jobs = [item]
            while sum(len(job.rows) for job in jobs) < self.max_batch_size:
                try:
                    item = self.inbox.get(timeout=max(0.0, jobs[0].arrived + self.batch_wait - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(item, Job):
                    pending = item  # a call or STOP: right after this batch
                    break
                jobs.append(item)
            rows = [row for job in jobs if not job.cancelled for row in job.rows]
            try:
                self._generate(rows)
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the server
                log.exception("batch failed")
                for row in rows:
                    row.fail(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))

    def _generate(self, rows):
        known = set(self.mt.downstreams)
        for row in rows:
            if row.task is not None and row.task not in known:
                row.fail(APIError(404, f"The model `{row.task}` was unloaded before this request ran.",
                                  param="model", code="model_not_found"))
        by_settings = {}
        for row in rows:
            if not row.done:
                by_settings.setdefault(row.job.settings, []).append(row)
        for settings, group in by_settings.items():
            for mixed, batch in plan_batches([row.task for row in group], self.max_batch_size, self.mode):
                self._run([group[i] for i in batch], mixed, dict(settings))

    def _run(self, rows, mixed, settings):
        try:
            self.mt.run_batch([row.prompt for row in rows], [row.task for row in rows], mixed,
                              max_new_tokens=max(row.max_tokens for row in rows),
                              streamer=RowStreamer(rows, self.decode, self.eos_ids),
                              stopping_criteria=StoppingCriteriaList([RowsDone(rows)]), **settings)
        except Exception as e:  # noqa: BLE001 - fail these rows, keep serving the others
            log.exception("generation failed")
            error = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            for row in rows:
                row.fail(error)

    def decode(self, tokens):
        return self.mt.tokenizer.decode(tokens, skip_special_tokens=True)


# ---------------------------------------------------------------- the app

class Gate:
    """ASGI middleware: bearer-token auth everywhere but /health, a body-size limit, and 503 once draining."""

    def __init__(self, app, api_key=None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            error = self.check(scope)
            if error is not None:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope):
        if scope["app"].state.draining:
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        headers = dict(scope["headers"])
        if self.api_key is not None:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
        return None


def create_app(mt, base_name=None, adapter_root=None, api_key=None, max_tokens_cap=512, max_batch_size=16,
               batch_wait_ms=5.0, context_length=None, mode="auto"):
    """The FastAPI app serving `mt` (a MultiTaskModel); serve it with `run` or any ASGI server.

    base_name: the model id of the plain base model (default: its name or path). adapter_root: the one
    folder /v1/load_lora_adapter loads from (None: loading at run time is off). api_key: required as a
    bearer token on every endpoint but /health. context_length: prompt plus completion tokens allowed
    (default: the model's max_position_embeddings). Every registered adapter is read and checked now.
    """
    base_name = base_name or mt.pretrained_model.config._name_or_path
    context_length = context_length or getattr(mt.pretrained_model.config, "max_position_embeddings", None)
    tokenizer = copy.deepcopy(mt.tokenizer)  # the worker thread uses the model's; HF tokenizers are not thread-safe
    worker = Worker(mt, max_batch_size, batch_wait_ms / 1000, mode)
    created = int(time.time())
    # {task: prompt format}: handlers read this, never the model (the worker thread owns that). Only
    # load/unload, running on the worker thread one at a time, replace it, and always whole.
    formats = {name: mt.adapter(name).prompt_format for name in mt.downstreams}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="lora-pytorch", lifespan=lifespan)
    app.state.draining = False
    app.add_middleware(Gate, api_key=api_key)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    # ------------------------------------------------------------ shared request handling

    def task_of(model, param="model"):
        """None for the base model, else the task; an unknown name is a 404, as OpenAI answers it."""
        if model == base_name:
            return None
        if model not in formats:
            raise APIError(404, f"The model `{model}` does not exist. Models here: "
                           f"{', '.join([base_name, *sorted(formats)])}", param=param, code="model_not_found")
        return model

    def task_prompt(task, instruction, input=""):
        return format_prompt(formats.get(task) or DEFAULT_PROMPT_FORMAT, instruction, input)

    def max_tokens_for(requested, prompt_tokens, default, param):
        if requested is not None and requested > max_tokens_cap:
            raise APIError(400, f"{param} is {requested}, over this server's cap of {max_tokens_cap}",
                           param=param, code="max_tokens_exceeded")
        room = context_length - prompt_tokens if context_length else max_tokens_cap
        max_tokens = requested or min(default or max_tokens_cap, max_tokens_cap, max(room, 1))
        if context_length and prompt_tokens + max_tokens > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you "
                           f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                           f"{max_tokens} for the completion). Please reduce the prompt or the completion length.",
                           param=param if requested else "prompt", code="context_length_exceeded")
        return max_tokens

    def submit(prompts, task, body, *, stream=False, strip=False, max_tokens=None, default_max_tokens=None,
               param="max_tokens", stop=None):
        """Queue one request's prompts for the worker, after checking them against the limits."""
        if getattr(body, "n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        # Rows share a batch only with rows of the same sampling settings; unset or 0 temperature is greedy.
        settings = () if not body.temperature else tuple(sorted(
            {"do_sample": True, "temperature": body.temperature,
             **({"top_p": body.top_p} if body.top_p is not None else {})}.items()))
        job = Job(asyncio.get_running_loop(), stream, settings)
        stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        for index, prompt in enumerate(prompts):
            prompt_tokens = len(encode_prompt(tokenizer, prompt))
            limit = max_tokens_for(max_tokens, prompt_tokens, default_max_tokens, param)
            job.rows.append(Row(job, index, task, prompt, prompt_tokens, limit, stop, strip))
        worker.submit(job)
        return job

    def usage(rows):
        prompt, completion = sum(r.prompt_tokens for r in rows), sum(r.generated for r in rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(job, chunks, include_usage):
        """A streamed answer as server-sent events: the chunks, usage if asked for, then [DONE]."""
        async def events():
            try:
                async for chunk in chunks():
                    yield f"data: {json.dumps(chunk)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**job.head, 'choices': [], 'usage': usage(job.rows)})}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                job.cancelled = True  # a client that went away stops costing generation steps
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    def model_card(name):
        return {"id": name, "object": "model", "created": created, "owned_by": "lora-pytorch",
                "root": base_name, "parent": None if name == base_name else base_name}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in [base_name, *sorted(formats)]]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        task_of(model)
        return model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """A raw prompt (or a list of them) continued with the task's adapter applied."""
        task = task_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        job = submit(prompts, task, body, stream=body.stream, max_tokens=body.max_tokens,
                     default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, stop=body.stop)
        job.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.model}

        def choice(index, text, finish_reason):
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if body.stream:
            async def chunks():
                async for kind, index, payload in job.stream_events():
                    text, reason = (payload, None) if kind == "delta" else ("", payload)
                    yield {**job.head, "choices": [choice(index, text, reason)]}
            return sse(job, chunks, body.stream_options and body.stream_options.include_usage)
        rows = await job.wait()
        return {**job.head, "choices": [choice(r.index, r.answer(), r.finish_reason) for r in rows],
                "usage": usage(rows)}

    def chat_prompt(task, messages):
        """The task's prompt format with the last user message as {instruction}; for the base model,
        its chat template over all messages when the tokenizer has one."""
        users = [m.text() for m in messages if m.role == "user"]
        if not users:
            raise APIError(400, "messages hold no user message", param="messages")
        if task is None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                 tokenize=False, add_generation_prompt=True)
        return task_prompt(task, users[-1])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        task = task_of(body.model)
        job = submit([chat_prompt(task, body.messages)], task, body, stream=body.stream, strip=True,
                     max_tokens=body.max_completion_tokens or body.max_tokens, stop=body.stop,
                     param="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        job.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                    "object": "chat.completion.chunk" if body.stream else "chat.completion"}
        if body.stream:
            async def chunks():
                yield {**job.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}
                async for kind, index, payload in job.stream_events():
                    delta, reason = ({"content": payload}, None) if kind == "delta" else ({}, payload)
                    yield {**job.head, "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}
            return sse(job, chunks, body.stream_options and body.stream_options.include_usage)
        (row,) = await job.wait()
        return {**job.head, "choices": [{"index": 0, "message": {"role": "assistant", "content": row.answer()},
                                         "finish_reason": row.finish_reason}], "usage": usage([row])}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        """The native API: {downstream, instruction, input} in, generate_response's answer out."""
        task = None if body.downstream is None else task_of(body.downstream, param="downstream")
        job = submit([task_prompt(task, body.instruction, body.input)], task, body, strip=True,
                     max_tokens=body.max_new_tokens, default_max_tokens=GENERATION_DEFAULTS["max_new_tokens"],
                     param="max_new_tokens")
        (row,) = await job.wait()
        return {"downstream": body.downstream, "response": row.answer(), "finish_reason": row.finish_reason,
                "usage": usage([row])}

    # ------------------------------------------------------------ adapters at run time (vLLM's endpoints)

    def inside_root(path):
        """The real path of `path` (a relative one starts at the adapter root) if it lies inside the root."""
        if adapter_root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root",
                           param="lora_path", code="adapter_loading_disabled", type="permission_error")
        root = os.path.realpath(adapter_root)
        try:
            real = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces the root here
        except ValueError as e:  # a NUL byte
            raise APIError(400, f"lora_path is not a valid path ({e})", param="lora_path") from None
        if os.path.commonpath([root, real]) != root:
            raise APIError(403, f"lora_path must lie inside the adapter root {adapter_root}", param="lora_path",
                           code="path_not_allowed", type="permission_error")
        return real

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        name, path = body.lora_name, inside_root(body.lora_path)
        if name == base_name:
            raise APIError(400, f"`{name}` is the base model's name", param="lora_name")

        def load():
            nonlocal formats
            if name in mt.downstreams:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            mt.add_downstream(name, path)
            try:
                prompt_format = mt.adapter(name).prompt_format  # read and check it now, not on first use
            except BaseException:
                mt.remove_downstream(name)
                raise
            formats = {**formats, name: prompt_format}
        try:
            await worker.call(load)
        except LoraError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        name = body.lora_name

        def unload():
            nonlocal formats
            if name not in mt.downstreams:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            mt.remove_downstream(name)
            formats = {task: fmt for task, fmt in formats.items() if task != name}
        await worker.call(unload)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: from the first SIGTERM/SIGINT on, new requests get 503 while in-flight ones finish."""

    def handle_exit(self, sig, frame):
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)


def run(app, host="127.0.0.1", port=8000, log_level="info"):
    """Serve `app` until SIGTERM or Ctrl-C, then finish what is in flight and exit."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
