"""TEMPORARY: the Engine API of notes/contracts.md over MultiTaskModel's static batches, and prompt_ids.

The server is written against lora/engine.py's API; until that module lands, this stand-in provides it
(static batches through Hugging Face `generate`, the old server's Worker). Delete this file then.
"""
import concurrent.futures
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..data import encode_prompt, format_prompt, pad_token_id
from ..errors import LoraError
from ..multitask import DEFAULT_PROMPT_FORMAT, plan_batches


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop: tuple = ()
    ignore_eos: bool = False
    seed: int = None


@dataclass
class Output:
    request_id: str
    text: str
    delta: str
    token_ids: list
    prompt_tokens: int
    finished: bool
    finish_reason: str = None
    error: Exception = None


class QueueFull(LoraError):
    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


def prompt_ids(tokenizer, meta, *, instruction="", input="", messages=None, prompt=None, prompt_format=None):
    if prompt is not None:
        return encode_prompt(tokenizer, prompt)
    if messages is not None:
        system = (meta or {}).get("system_prompt")
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
    fmt = prompt_format or (meta or {}).get("prompt_format") or DEFAULT_PROMPT_FORMAT
    return encode_prompt(tokenizer, format_prompt(fmt, instruction, input))


class _Request:
    def __init__(self, request_id, ids, task, sampling, on_output):
        self.id, self.ids, self.task, self.sampling, self.on_output = request_id, ids, task, sampling, on_output
        self.tokens, self.text, self.sent, self.finish_reason, self.aborted = [], "", "", None, False
        self.hold = max(map(len, sampling.stop), default=1) - 1

    @property
    def done(self):
        return self.finish_reason is not None or self.aborted

    def _emit(self, text, finished=False, error=None):
        delta, self.sent = text[len(self.sent):], text
        if self.on_output:
            self.on_output(Output(self.id, text, delta, list(self.tokens), len(self.ids), finished,
                                  self.finish_reason, error))

    def add(self, token, decode, eos_ids):
        if token in eos_ids and not self.sampling.ignore_eos:
            return self.finish("stop", decode(self.tokens))
        self.tokens.append(token)
        text = decode(self.tokens)
        cut = min((at for at in map(text.find, self.sampling.stop) if at >= 0), default=None)
        if cut is not None:
            return self.finish("stop", text[:cut])
        if len(self.tokens) >= self.sampling.max_tokens:
            return self.finish("length", text)
        visible = text.rstrip("\ufffd")
        visible = visible[:len(visible) - self.hold]
        if len(visible) > len(self.sent) and visible.startswith(self.sent):
            self._emit(visible)

    def finish(self, reason, text=None, error=None):
        if self.finish_reason is None:
            self.finish_reason = reason
            self._emit(self.sent if text is None else text, True, error)


class _Streamer(BaseStreamer):
    def __init__(self, requests, decode, eos_ids):
        self.requests, self.decode, self.eos_ids, self.prompt_seen = requests, decode, eos_ids, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for r, token in zip(self.requests, value.tolist()):
            if not r.done:
                r.add(token, self.decode, self.eos_ids)

    def end(self):
        for r in self.requests:
            if r.aborted:
                r.finish("abort")
            else:
                r.finish("length", self.decode(r.tokens))


class _Done(StoppingCriteria):
    def __init__(self, requests):
        self.requests = requests

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([r.done for r in self.requests], device=input_ids.device)


class Engine:
    def __init__(self, mt, *, max_num_seqs=16, max_model_len=None, max_waiting=1024, batch_wait=0.005, **_):
        self.mt, self.max_num_seqs, self.max_waiting, self.batch_wait = mt, max_num_seqs, max_waiting, batch_wait
        self.max_model_len = max_model_len or getattr(mt.pretrained_model.config, "max_position_embeddings", None)
        eos = mt.generation_kwargs({})["eos_token_id"]
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.inbox, self.requests, self.ids = queue.Queue(), {}, itertools.count()
        self._stats = {"running": 0, "prompt_tokens_total": 0, "generation_tokens_total": 0}
        self.thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)

    def start(self):
        self.thread.start()

    def shutdown(self):
        self.inbox.put(None)
        self.thread.join()

    def add_request(self, prompt_ids, task, sampling, on_output=None, request_id=None):
        if task is not None and task not in self.mt.downstreams:
            raise LoraError(f"unknown downstream task {task!r}")
        if self.max_model_len and len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise LoraError(f"prompt of {len(prompt_ids)} tokens plus {sampling.max_tokens} is over "
                            f"{self.max_model_len}")
        if self.inbox.qsize() >= self.max_waiting:
            raise QueueFull(f"{self.inbox.qsize()} requests are waiting", retry_after=1)
        request = _Request(request_id or f"req-{next(self.ids)}", list(prompt_ids), task, sampling, on_output)
        self.requests[request.id] = request
        self.inbox.put(request)
        return request.id

    def abort(self, request_id):
        request = self.requests.get(request_id)
        if request is not None:
            request.aborted = True

    def call(self, fn):
        future = concurrent.futures.Future()
        self.inbox.put((fn, future))
        return future

    def stats(self):
        return {**self._stats, "waiting": self.inbox.qsize(), "kv_cache_usage": 0.0}

    def _loop(self):
        pending = None
        while True:
            item, pending = pending or self.inbox.get(), None
            if item is None:
                return
            if isinstance(item, tuple):
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001
                    future.set_exception(e)
                continue
            batch, start = [item], time.monotonic()
            while len(batch) < self.max_num_seqs:
                try:
                    item = self.inbox.get(timeout=max(0.0, start + self.batch_wait - time.monotonic()))
                except queue.Empty:
                    break
                if not isinstance(item, _Request):
                    pending = item
                    break
                batch.append(item)
            live = []
            for r in batch:
                if r.aborted:
                    r.finish("abort")
                elif r.task is not None and r.task not in self.mt.downstreams:
                    r.finish("error", error=LoraError(f"task {r.task!r} was unloaded"))
                else:
                    live.append(r)
            groups = {}
            for r in live:
                s = r.sampling
                groups.setdefault((s.temperature, s.top_p, s.top_k, s.min_tokens, s.ignore_eos, s.seed), []).append(r)
            self._stats["running"] = len(live)
            for key, group in groups.items():
                for mixed, rows in plan_batches([r.task for r in group], self.max_num_seqs):
                    self._run([group[i] for i in rows], mixed, key)
            self._stats["running"] = 0
            for r in batch:
                self.requests.pop(r.id, None)

    def _run(self, requests, mixed, key):
        temperature, top_p, top_k, min_tokens, ignore_eos, seed = key
        settings = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if seed is not None:
            torch.manual_seed(seed)
        width, pad = max(len(r.ids) for r in requests), pad_token_id(self.mt.tokenizer)
        device = self.mt.device
        input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in requests], device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in requests], device=device)
        tasks = [r.task for r in requests]
        try:
            self.mt.activate(None if mixed else tasks[0])
            with (self.mt.mixed_batch(tasks) if mixed else contextlib.nullcontext()), torch.no_grad():
                settings["max_new_tokens"] = max(r.sampling.max_tokens for r in requests)
                self.mt.pretrained_model.generate(
                    input_ids=input_ids, attention_mask=mask,
                    min_new_tokens=min_tokens or None, streamer=_Streamer(requests, self.decode, self.eos_ids),
                    stopping_criteria=StoppingCriteriaList([_Done(requests)]),
                    **{**self.mt.generation_kwargs(settings), **({"eos_token_id": None} if ignore_eos else {})})
        except Exception as e:  # noqa: BLE001
            for r in requests:
                r.finish("error", error=e)
        self._stats["prompt_tokens_total"] += sum(len(r.ids) for r in requests)
        self._stats["generation_tokens_total"] += sum(len(r.tokens) for r in requests)

    def decode(self, tokens):
        return self.mt.tokenizer.decode(tokens, skip_special_tokens=True)

