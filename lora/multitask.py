"""MultiTaskModel: one base model's tasks (lora.tasks) answering request dicts through one long-lived engine."""
import os
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from . import prompts
from .engine import Engine, Output, SamplingParams
from .errors import LoraError
from .models import context_length
from .structured import GUIDED_FIELDS, Grammar, guide, request_constraint
from .tasks import Tasks

# what a request may constrain its answer with (see lora.structured.request_constraint)
CONSTRAINT_KEYS = {"response_format", "structured_outputs", *GUIDED_FIELDS}
REQUEST_KEYS = {"downstream", "instruction", "input", "prompt", "messages", "prompt_format", *CONSTRAINT_KEYS}
# generate_response's settings, named as transformers' generate names them, and what the engine calls them
GENERATION_KEYS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                   "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}
DEFAULT_MAX_NEW_TOKENS = 256
SHORTEST_ENGINE = 256  # tokens per sequence of the first engine; a longer request gets one of the next power of 2


class _Engine(NamedTuple):
    engine: Engine
    batch_size: int
    mode: str
    max_model_len: int


class MultiTaskModel(Tasks):
    """Tasks (a base model and its LoRA task adapters, see lora.tasks.Tasks) plus generation.

    Takes Tasks' arguments. `generate_responses` runs every request through one continuous-batching engine
    (lora.engine.Engine) that lives as long as the model; it is replaced only when a call asks for another
    batch size or mode, or a longer sequence than it holds, when a task is removed or replaced, or after an
    interrupted call. Calls from several threads take turns on it, unless `start()` gave the model an engine
    thread: then every call, from any thread, joins the one running batch.
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike, mapper: str | os.PathLike | dict | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 tokenizer: object = None, cache_bytes: int = 512 << 20, host_cache_bytes: int = 2 << 30,
                 merged_cache_bytes: int = 2 << 30, update_dtype: torch.dtype = torch.float32,
                 quantize: str | None = None, double_quant: bool = False, compute_dtype: str | None = None,
                 quantize_head: bool | None = None) -> None:
        self._engine: _Engine | None = None
        self._engine_lock = threading.Lock()  # one caller drives the engine at a time
        super().__init__(model, mapper, device, dtype, tokenizer, cache_bytes, host_cache_bytes, merged_cache_bytes,
                         update_dtype, quantize, double_quant, compute_dtype, quantize_head)

    def start(self, batch_size: int = 16, mode: str = "auto", **engine_args: Any) -> Engine:
        """Give the model one engine thread that every generate_response(s) call shares, so calls from many
        threads are batched together (continuous batching); `engine_args` as lora.engine.Engine takes them.
        Returns the engine (its add_request/stats are there too); `shutdown()` stops it."""
        with self._engine_lock:
            self.shutdown()
            length = engine_args.pop("max_model_len", None) or context_length(self.pretrained_model.config)
            engine = Engine(self, max_num_seqs=batch_size, max_model_len=length, mode=mode, **engine_args)
            engine.start()
            self._engine = _Engine(engine, batch_size, mode, length)
            return engine

    def shutdown(self) -> None:
        """Stop the engine thread `start()` began, after the requests it holds finish."""
        if self._engine is not None and self._engine.engine.started:
            self._engine.engine.shutdown()
            self._engine = None

    def _meta(self, downstream: Any) -> dict | None:
        """lora_task.json of a request's task (of a blend's heaviest task); None for the base model."""
        spec = self.normalize(downstream)
        return self.task_meta(max(spec, key=lambda kv: kv[1])[0]) if spec else None

    def response_schema(self, downstream: Any) -> dict | None:
        """The JSON schema a task's answers follow by default (lora_task.json's response_schema), if it has one."""
        meta = self._meta(downstream)
        return meta.get("response_schema") if meta else None

    def grammar(self, body: Mapping[str, Any], downstream: Any = None) -> Grammar | None:
        """The compiled constraint of a request: its response_format / guided_* / structured_outputs, else its
        task's response_schema; None when unconstrained. Compiling takes milliseconds (cached per schema), so
        callers do it on their own thread; a schema that cannot be compiled is a LoraError naming the problem."""
        constraint = request_constraint(body, self.response_schema(downstream))
        return None if constraint is None else guide(self.tokenizer).compile(constraint)

    def prompt_ids(self, request: dict) -> list[int]:
        """The prompt token ids of a request dict, rendered as its task was trained (see lora.prompts)."""
        meta = self._meta(request.get("downstream"))
        return prompts.prompt_ids(self.tokenizer, meta, instruction=request.get("instruction", ""),
                                  input=request.get("input", ""), messages=request.get("messages"),
                                  prompt=request.get("prompt"), prompt_format=request.get("prompt_format"))

    def generate_responses(self, requests: list[dict], batch_size: int = 16, mode: str = "auto") -> list[str]:
        """Answer many requests with continuous batching; answers come back in request order.

        Each request is a dict with `downstream`, `instruction`, `input` (or a raw `prompt`, or chat
        `messages`) and optional settings named as transformers' generate names them: max_new_tokens
        (256), min_new_tokens, temperature (0: greedy), top_p, top_k, seed, stop. An answer follows the
        task's response_schema (lora_task.json) unless the request gives its own constraint, as OpenAI's and
        vLLM's APIs name them: response_format ({"type": "text"} for none), guided_json, guided_regex,
        guided_choice, guided_grammar or structured_outputs. `mode` is how tasks share a step (see
        lora.engine.Engine): "auto", "merged" or "mixed".
        """
        context = context_length(self.pretrained_model.config)
        ids, tasks, sampling = [], [], []
        for request in requests:
            unknown = sorted(set(request) - REQUEST_KEYS - set(GENERATION_KEYS))
            if unknown:
                raise LoraError(f"unknown generation setting {unknown[0]!r}; use "
                                f"{', '.join([*GENERATION_KEYS, *sorted(CONSTRAINT_KEYS)])}")
            ids.append(self.prompt_ids(request))
            tasks.append(request.get("downstream"))
            sampling.append(sampling_params(request, room=context - len(ids[-1])))
            sampling[-1].grammar = self.grammar(request, tasks[-1])
        if not ids:
            return []
        longest = max(len(p) + s.max_tokens for p, s in zip(ids, sampling))
        held = self._engine
        if held is not None and held.engine.started:  # shared: this call's requests join the running batch
            return _answers(held.engine.generate(ids, tasks, sampling))
        with self._engine_lock:
            engine = self._engine_for(batch_size, mode, min(longest, context), context)
            try:
                outputs = engine.generate(ids, tasks, sampling)
            except BaseException:
                self._engine = None  # its sequences are left half done: the next call starts afresh
                raise
        return _answers(outputs)

    def generate_response(self, downstream: Any = None, instruction: str = "", input: str = "",
                          **generation_kwargs: Any) -> str:
        """The task's answer to one instruction: its prompt format filled in, greedy by default."""
        return self.generate_responses([{"downstream": downstream, "instruction": instruction, "input": input,
                                         **generation_kwargs}])[0]

    def _engine_for(self, batch_size: int, mode: str, length: int, context: int) -> Engine:
        held = self._engine
        if held is None or (held.batch_size, held.mode) != (batch_size, mode) or held.max_model_len < length:
            max_model_len = min(context, max(SHORTEST_ENGINE, 1 << (length - 1).bit_length()))
            engine = Engine(self, max_num_seqs=batch_size, max_model_len=max_model_len, mode=mode)
            held = self._engine = _Engine(engine, batch_size, mode, max_model_len)
        return held.engine


def _answers(outputs: list[Output]) -> list[str]:
    for out in outputs:
        if out.error is not None:
            raise out.error
    return [out.text.strip() for out in outputs]


def sampling_params(request: dict, room: int) -> SamplingParams:
    """A request's generate-style settings as the engine's SamplingParams; by default the answer may
    take 256 tokens, or what is left of the model's context (`room`) if that is less."""
    settings = {GENERATION_KEYS[k]: v for k, v in request.items() if k in GENERATION_KEYS}
    settings.setdefault("max_tokens", max(1, min(DEFAULT_MAX_NEW_TOKENS, room)))
    return SamplingParams(**settings)
