"""Continuous batching: one loop owns the model and runs one forward per step over every running sequence.

A step (`Engine.step`):
  1. run queued calls (adapter loads and unloads), drop aborted sequences, admit waiting requests into
     free KV-cache slots;
  2. lay out one flat batch: the next token of every decoding sequence, then prompt chunks of prefilling
     ones up to `max_prefill_tokens` (chunked prefill: one huge prompt never stalls decoding);
  3. choose how tasks run: when every sequence of the step uses one task it runs on that task's merged
     weights, at base-model speed; otherwise on the base weights plus each token's own task's low-rank
     update (S-LoRA / Punica style, see `layers.mixed_update_hook`). Going back to merged waits for
     `merge_after` steps of one task, so a stream of mixed requests cannot make it thrash;
  4. one forward: `paged_attention` writes each token's K/V into its sequence's cache slot and attends over
     that slot only; logits are computed only for the last token of each sequence;
  5. sample per request, detokenize, check stop conditions and hand each request its `Output`; finished
     sequences free their slot at once, so a short request never waits for a long one.

The KV cache is allocated once: per layer, K and V tensors of (slots, kv heads, max_model_len, head dim).
Decoding sequences attend over a view of slots [0, hi), so nothing is copied or reallocated per step.
"""
import concurrent.futures
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import LoraError

ATTENTION = "lora_paged"
MODES = ("auto", "merged", "mixed")
ZERO_BLOCK = 256  # cache positions are zeroed in blocks as sequences first reach them (see KVCache.reach)
_ids = itertools.count()


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop: tuple = ()
    ignore_eos: bool = False
    seed: int | None = None

    def check(self):
        for name, ok in (("max_tokens", self.max_tokens >= 1), ("temperature", self.temperature >= 0),
                         ("top_p", 0 < self.top_p <= 1), ("top_k", self.top_k >= 0),
                         ("min_tokens", 0 <= self.min_tokens <= self.max_tokens)):
            if not ok:
                raise LoraError(f"sampling parameter {name}={getattr(self, name)!r} is out of range")
        self.stop = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)
        return self


@dataclass
class Output:
    """A request's state, handed to its callback after each step that changed it."""
    request_id: str
    text: str
    delta: str
    token_ids: list
    prompt_tokens: int
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: BaseException | None = None
    # serve's shim of the engine package's contract (PLAN.md); the lead drops it at merge
    new_token_ids: list = field(default_factory=list)
    num_tokens: int = 0
    num_prompt_tokens: int = 0


class EngineDead(LoraError):
    """The engine thread has stopped; no request can be answered any more (serve's shim, see PLAN.md)."""


class QueueFull(LoraError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, message, retry_after=1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list
    spec: tuple | None  # MultiTaskModel.normalize's form: None (base) or ((task, weight), ...)
    sampling: SamplingParams
    on_output: object = None
    generator: torch.Generator | None = None
    slot: int = -1
    computed: int = 0  # prompt tokens whose K/V are in the cache
    tokens: list = field(default_factory=list)
    sent: str = ""
    output: Output | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def decoding(self):
        return self.computed == len(self.prompt)


class KVCache:
    """Per layer, K and V of shape (slots, kv heads, max_len, head dim), allocated at the layer's first use.

    Memory is allocated uninitialised and zeroed in blocks only as far as sequences reach, so an idle
    cache costs address space, not RAM; masked-out positions must hold finite values (0 * NaN is NaN).
    """

    def __init__(self, slots, max_len):
        self.slots, self.max_len, self.layers, self.zeroed = slots, max_len, {}, 0

    def layer(self, index, like):
        if index not in self.layers:
            shape = (self.slots, like.shape[1], self.max_len, like.shape[3])
            k, v = like.new_empty(shape), like.new_empty(shape)
            k[:, :, :self.zeroed].zero_()
            v[:, :, :self.zeroed].zero_()
            self.layers[index] = (k, v)
        return self.layers[index]

    def reach(self, length):
        """Make positions [0, length) of every slot finite before attention reads them."""
        while self.zeroed < length:
            end = min(self.max_len, self.zeroed + ZERO_BLOCK)
            for k, v in self.layers.values():
                k[:, :, self.zeroed:end].zero_()
                v[:, :, self.zeroed:end].zero_()
            self.zeroed = end


class StepBatch:
    """One step's flat batch: decode tokens (one per decoding sequence, in slot order), then prompt chunks."""

    def __init__(self, cache, decode, chunks, device):
        self.cache = cache
        ids, positions, slots, keep = [], [], [], []
        for seq in decode:
            ids.append(seq.tokens[-1])
            positions.append(len(seq.prompt) + len(seq.tokens) - 1)
            slots.append(seq.slot)
            keep.append(len(ids) - 1)
        self.n_decode = len(decode)
        self.chunks = []
        for seq, start, end in chunks:
            offset = len(ids)
            ids += seq.prompt[start:end]
            positions += range(start, end)
            slots += [seq.slot] * (end - start)
            if end == len(seq.prompt):
                keep.append(len(ids) - 1)
            causal = torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]
            self.chunks.append((offset, len(ids), seq.slot, end, causal))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        self.input_ids, self.positions, self.slots = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        self.keep = as_tensor(keep)
        if decode:
            self.hi = max(seq.slot for seq in decode) + 1
            self.dense = self.hi == len(decode)  # decoding slots are exactly 0..hi-1, in order
            self.decode_slots = self.slots[:self.n_decode]
            lengths = torch.ones(self.hi, dtype=torch.long, device=device)  # idle slots attend to position 0 only
            lengths[self.decode_slots] = self.positions[:self.n_decode] + 1
            self.decode_len = int(lengths.max())
            self.decode_mask = (torch.arange(self.decode_len, device=device)[None, :] < lengths[:, None])[:, None, None]
        cache.reach(max([*positions, 0]) + 1)

    def attend(self, layer, query, key, value, scaling):
        """Write this step's K/V into the cache, then attend each token over its own sequence's slot.

        Grouped-query heads need no copy: the G query heads that share a kv head become G queries of it.
        """
        k_cache, v_cache = self.cache.layer(layer, key)
        k_cache[self.slots, :, self.positions] = key[0].transpose(0, 1)
        v_cache[self.slots, :, self.positions] = value[0].transpose(0, 1)
        heads, d = query.shape[1], query.shape[3]
        kv_heads = k_cache.shape[1]
        groups = heads // kv_heads
        out = query.new_empty(query.shape[2], heads, d)
        n = self.n_decode
        if n:
            q = query[0, :, :n].reshape(kv_heads, groups, n, d).permute(2, 0, 1, 3)  # (n, kv heads, G, d)
            if not self.dense:
                q = q.new_zeros(self.hi, kv_heads, groups, d).index_copy_(0, self.decode_slots, q)
            o = F.scaled_dot_product_attention(q, k_cache[:self.hi, :, :self.decode_len],
                                               v_cache[:self.hi, :, :self.decode_len],
                                               attn_mask=self.decode_mask, scale=scaling)
            if not self.dense:
                o = o.index_select(0, self.decode_slots)
            out[:n] = o.reshape(n, heads, d)
        for start, end, slot, length, causal in self.chunks:
            c = end - start
            q = query[:, :, start:end].reshape(1, kv_heads, groups * c, d)
            o = F.scaled_dot_product_attention(q, k_cache[slot:slot + 1, :, :length], v_cache[slot:slot + 1, :, :length],
                                               attn_mask=causal.repeat(groups, 1), scale=scaling)
            out[start:end] = o[0].reshape(kv_heads, groups, c, d).permute(2, 0, 1, 3).reshape(c, heads, d)
        return out[None], None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lora_step=None, **kwargs):
    """The engine's attention; any call without an engine step (training, `apply_downstream`) is plain SDPA."""
    if lora_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return lora_step.attend(module.layer_idx, query, key, value, scaling)


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the tokenizer's eos and the generation config's (chat models list several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def kv_bytes_per_token(config, dtype):
    """K and V bytes one token takes in every layer, from the model config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def sample(logits, seq):
    """The next token of one sequence from its logits (float32), with temperature, top-k and top-p."""
    s = seq.sampling
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=seq.generator))


class Engine:
    """Continuous batching over a `MultiTaskModel`: the one place that runs the model for generation.

    Args:
        mt: the MultiTaskModel whose base model and task adapters serve the requests.
        max_num_seqs: sequences running at once (KV-cache slots).
        max_model_len: prompt plus answer tokens per sequence (default: the model's context, at most 4096).
        kv_cache_bytes: memory for the KV cache; fewer slots than max_num_seqs if it cannot hold them.
        max_prefill_tokens: prompt tokens prefilled per step (chunked prefill).
        max_waiting: requests that may wait for a slot; beyond it add_request raises QueueFull.
        mode: "auto" (merged weights when a step has one task, else per-token updates), "merged" (one task
            at a time, others wait) or "mixed" (always per-token updates).
        merge_after: steps of one task before "auto" goes back to merged weights.
    """

    def __init__(self, mt, *, max_num_seqs=16, max_model_len=None, kv_cache_bytes=None, max_prefill_tokens=512,
                 max_waiting=1024, mode="auto", merge_after=8):
        if mode not in MODES:
            raise LoraError(f"unknown batching mode {mode!r}; use one of {', '.join(MODES)}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_prefill_tokens", max_prefill_tokens)):
            if value < 1:
                raise LoraError(f"{name} must be at least 1, got {value}")
        self.mt, self.model, self.tokenizer = mt, mt.pretrained_model, mt.tokenizer
        self.device, self.mode, self.merge_after = mt.device, mode, merge_after
        context = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = max_model_len or min(context, 4096)
        if self.max_model_len > context:
            raise LoraError(f"max_model_len {self.max_model_len} is over the model's context of {context} tokens")
        per_slot = self.max_model_len * kv_bytes_per_token(self.model.config, mt.dtype)
        slots = max_num_seqs if kv_cache_bytes is None else min(max_num_seqs, int(kv_cache_bytes // per_slot))
        if slots < 1:
            raise LoraError(f"the KV cache budget of {kv_cache_bytes} bytes holds no sequence of {self.max_model_len} "
                            f"tokens ({per_slot} bytes); raise the budget or lower max_model_len")
        self.cache = KVCache(slots, self.max_model_len)
        self.max_num_seqs = slots  # serve's shim: the engine's real settings, read by create_app
        self.max_prefill_tokens, self.max_waiting = max_prefill_tokens, max_waiting
        self.eos = eos_ids(self.model, self.tokenizer)
        self.model.set_attn_implementation(ATTENTION)
        self.waiting, self.running = deque(), []  # running: admitted, in slot order
        self._cond = threading.Condition()
        self._calls, self._aborts = [], set()
        self._thread, self._stopping = None, False
        self.dead: BaseException | None = None
        self._mixed, self._merged_steps, self._spec = None, 0, None
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "steps_total": 0}

    # ------------------------------------------------------------------ the API other threads call

    def add_request(self, prompt_ids, task, sampling, on_output=None, request_id=None):
        """Queue one request; returns its id. Thread-safe. Raises LoraError for a bad request, QueueFull."""
        seq = self._sequence(prompt_ids, task, sampling, on_output, request_id)
        with self._cond:
            if self.dead is not None:
                raise EngineDead(f"the engine has stopped ({type(self.dead).__name__}: {self.dead}); restart the server")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already; try again shortly")
            self.waiting.append(seq)
            self._cond.notify()
        return seq.request_id

    def abort(self, request_id):
        """Stop a request (its client went away); its slot is freed at the next step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def call(self, fn):
        """Run fn() on the engine's thread between two steps (adapter load/unload); returns a Future."""
        future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        if self._thread is None:
            self._run_calls()
        return future

    def start(self):
        """Step in a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout=None):
        """Finish every queued and running request, then stop the thread (waiting at most `timeout` s)."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join(timeout)
            self._thread = None

    def generate(self, prompts, tasks, sampling):
        """Answer many prompts (token ids) for their tasks; Outputs in the same order. Blocks until done."""
        sampling = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        seqs = [self._sequence(p, t, s, None, None) for p, t, s in zip(prompts, tasks, sampling)]
        with self._cond:
            self.waiting.extend(seqs)
            self._cond.notify()
        for seq in seqs:
            while not seq.done.is_set():
                if self._thread is None:
                    self.step()
                else:
                    seq.done.wait()
        return [seq.output for seq in seqs]

    def stats(self):
        used = sum(len(s.prompt) + len(s.tokens) for s in self.running)
        running, waiting = list(self.running), list(self.waiting)

        def tasks(seqs):
            return sorted({name for s in seqs if s.spec for name, _ in s.spec})
        return {"running": len(running), "waiting": len(waiting),
                "kv_cache_usage": used / (self.cache.slots * self.cache.max_len), **self.counters,
                "running_lora_adapters": tasks(running), "waiting_lora_adapters": tasks(waiting),
                "max_lora": self.cache.slots}

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def step(self):
        """One iteration: admit, lay out, forward, sample. Returns False when there was nothing to do."""
        self._run_calls()
        self._admit()
        if not self.running:
            return False
        decode = [s for s in self.running if s.decoding]
        budget, chunks = self.max_prefill_tokens, []
        for seq in self.running:
            if not seq.decoding and budget > 0:
                end = min(len(seq.prompt), seq.computed + budget)
                chunks.append((seq, seq.computed, end))
                budget -= end - seq.computed
        with self.mt.lock:
            try:
                batch = StepBatch(self.cache, decode, chunks, self.device)
                with self._tasks(decode + [seq for seq, _, _ in chunks], batch):
                    logits = self.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                                        use_cache=False, logits_to_keep=batch.keep, lora_step=batch).logits[0].float()
            except Exception as e:  # noqa: BLE001 - fail this step's sequences, keep serving the others
                for seq in decode + [seq for seq, _, _ in chunks]:
                    self._finish(seq, "error", error=e)
                self._release()
                return True
        self.counters["steps_total"] += 1
        for seq, start, end in chunks:
            seq.computed = end
            self.counters["prompt_tokens_total"] += end - start
        sampled = decode + [seq for seq, _, end in chunks if end == len(seq.prompt)]
        for i, seq in enumerate(sampled):
            if len(seq.tokens) < seq.sampling.min_tokens:
                logits[i, self.eos] = -math.inf
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        for i, seq in enumerate(sampled):
            self._append(seq, greedy[i] if seq.sampling.temperature == 0 else sample(logits[i], seq))
        self._release()
        return True

    def _sequence(self, prompt_ids, task, sampling, on_output, request_id):
        sampling.check()
        spec = self.mt.normalize(task)
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise LoraError("the prompt is empty; send at least one token of text")
        if len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise LoraError(f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                            f"{len(prompt_ids) + sampling.max_tokens} ({len(prompt_ids)} in the prompt, "
                            f"{sampling.max_tokens} to generate): shorten the prompt or lower max_tokens")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        return Sequence(request_id or f"req-{next(_ids)}", prompt_ids, spec, sampling, on_output, generator)

    def _run_calls(self):
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(e)

    def _admit(self):
        """Aborts and unloaded tasks leave; waiting requests take free slots, first come first served."""
        with self._cond:
            aborts, self._aborts = self._aborts, set()
            known = set(self.mt.downstreams)
            for seq in [*self.waiting, *self.running]:
                if seq.request_id in aborts:
                    self._finish(seq, "abort")
                elif seq.spec and any(name not in known for name, _ in seq.spec):
                    self._finish(seq, "error", error=LoraError(f"task {seq.spec[0][0]!r} was unloaded"))
            self.waiting = deque(s for s in self.waiting if not s.done.is_set())
            self._release()
            free = sorted(set(range(self.cache.slots)) - {s.slot for s in self.running})
            for seq in list(self.waiting):
                if not free:
                    break
                if not self._fits(seq):
                    continue
                self.waiting.remove(seq)
                seq.slot = free.pop(0)
                self.running.append(seq)
            self.running.sort(key=lambda s: s.slot)

    def _fits(self, seq):
        """Whether seq may join the running ones: blends (and every task in "merged" mode) run alone."""
        specs = {s.spec for s in self.running}
        if not specs:
            return True
        alone = self.mode == "merged" or not self.mt.can_mix(seq.spec) or any(not self.mt.can_mix(s) for s in specs)
        return not alone or specs == {seq.spec}

    def _tasks(self, seqs, batch):
        """Merged weights when the step has one task (after `merge_after` such steps), else per-token updates.

        Returns the context to run the forward in: the hooks are on the model only during it.
        """
        specs = {s.spec for s in seqs}
        uniform = len(specs) == 1
        self._merged_steps = self._merged_steps + 1 if uniform and specs == {self._spec} else int(uniform)
        self._spec = next(iter(specs)) if uniform else None
        must_merge = uniform and not self.mt.can_mix(self._spec)
        if self.mode == "merged" or must_merge or (
                self.mode == "auto" and uniform and (self._mixed is None or self._merged_steps >= self.merge_after)):
            self._mixed = None
            self.mt.activate(self._spec)
            return contextlib.nullcontext()
        tasks = sorted({name for s in specs if s for name, _ in s})
        if self._mixed is None or not set(tasks) <= set(self._mixed.tasks) or len(self._mixed.tasks) > 2 * len(tasks) + 2:
            self._mixed = self.mt.mix(tasks)
        self.mt.activate(None)
        index = {name: i + 1 for i, name in enumerate(self._mixed.tasks)}
        per_seq = [index[s.spec[0][0]] if s.spec else 0 for s in seqs]
        counts = [1] * batch.n_decode + [end - start for start, end, *_ in batch.chunks]
        self._mixed.select(torch.tensor(per_seq, device=self.device).repeat_interleave(
            torch.tensor(counts, device=self.device))[None])
        return self._mixed.attached()

    def _append(self, seq, token):
        """Add a sampled token; finish on eos, a stop string or max_tokens; tell the request."""
        seq.tokens.append(token)
        self.counters["generation_tokens_total"] += 1
        s = seq.sampling
        if token in self.eos and not s.ignore_eos and len(seq.tokens) > s.min_tokens:
            return self._finish(seq, "stop")
        if not (s.stop or seq.on_output) and len(seq.tokens) < s.max_tokens:
            return None  # nobody looks at the text before the end
        text = self._decode(seq)
        cut = min((at for at in map(text.find, s.stop) if at >= 0), default=None)
        if cut is not None:
            return self._finish(seq, "stop", text[:cut])
        if len(seq.tokens) >= s.max_tokens:
            return self._finish(seq, "length", text)
        hold = max(map(len, s.stop), default=1) - 1  # text that may yet become a stop string
        visible = text.rstrip("\ufffd")  # a character whose bytes are still to come
        self._emit(seq, visible[:len(visible) - hold] if hold else visible)

    def _decode(self, seq):
        return self.tokenizer.decode(seq.tokens, skip_special_tokens=True)

    def _emit(self, seq, text, finish_reason=None, error=None):
        """Hand the request its state after a new token (the delta may be empty: the text is held back)."""
        delta = text[len(seq.sent):] if text.startswith(seq.sent) else ""
        seq.sent = text if delta or finish_reason else seq.sent
        sent = seq.output.num_tokens if seq.output is not None else 0
        seq.output = Output(seq.request_id, text, delta, list(seq.tokens), len(seq.prompt), finish_reason is not None,
                            finish_reason, error, list(seq.tokens[sent:]), len(seq.tokens), len(seq.prompt))
        if seq.on_output is not None:
            seq.on_output(seq.output)

    def _finish(self, seq, reason, text=None, error=None):
        if seq.done.is_set():
            return
        self._emit(seq, self._decode(seq) if text is None else text, reason, error)
        seq.done.set()

    def _release(self):
        """Finished sequences leave the running set; their slots are free for the next admission."""
        self.running = [s for s in self.running if not s.done.is_set()]

    def _loop(self):
        try:
            self._steps()
        except BaseException as e:  # serve's shim of the engine package's `dead` contract
            with self._cond:
                self.dead = e
                for seq in [*self.waiting, *self.running]:
                    self._finish(seq, "error", error=EngineDead(f"the engine has stopped ({type(e).__name__}: {e})"))
                self.waiting.clear()
                self.running = []

    def _steps(self):
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self.waiting or self.running or self._calls):
                    return
            self.step()
