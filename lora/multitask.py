"""One base model, many task adapters: a lazy adapter registry, exact weight swapping, and generation.

The base weights are never written. Applying a task builds its merged weights W = W0 + s * B @ A
in separate tensors, one fused addmm per weight, and points each targeted parameter at them;
going back points them at W0 again. Nothing is ever subtracted, so any sequence of switches leaves
bitwise the weights a single switch would, in any dtype. The most recently used tasks keep their
merged weights (`merged_cache_bytes`, 2 GiB by default, at least the active task's), so switching
among them copies nothing; a switch to another task builds only the layers that task targets, in
new buffers or, once the cache is full, in those of the least recently used task.
"""
import contextlib
import itertools
import json
import os
import threading
from collections import OrderedDict

import torch

from .checkpoint import ModuleAdapter, check_compatible, read_adapter
from .data import check_prompt_format, encode_prompt, format_prompt, pad_token_id
from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text
from .layers import mixed_update_hook, weight_is_transposed
from .models import load_model

DEFAULT_PROMPT_FORMAT = "{instruction}\n\n{input}"
GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": False}
REQUEST_KEYS = ("downstream", "instruction", "input", "prompt", "prompt_format")
MODES = ("merged", "mixed", "auto")  # how tasks share a batch: see plan_batches
_tokens = itertools.count()


def read_mapper(mapper):
    """{task: checkpoint dir} from a JSON file (paths relative to it), a dict, or a folder of checkpoints."""
    if mapper is None:
        return {}
    if isinstance(mapper, dict):
        return {str(k): os.fspath(v) for k, v in mapper.items()}
    mapper = os.fspath(mapper)
    if os.path.isdir(mapper):
        return {e.name: e.path for e in sorted(os.scandir(mapper), key=lambda e: e.name)
                if e.is_dir() and os.path.exists(os.path.join(e.path, "adapter_config.json"))}
    try:
        entries = json.loads(read_text(mapper, what="checkpoint mapper", max_bytes=MAX_JSON_BYTES))
    except (ValueError, RecursionError) as e:
        raise LoraError(f"checkpoint mapper {mapper} is not valid JSON ({e})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise LoraError(f"checkpoint mapper {mapper} must be a JSON object {{task name: checkpoint directory}}")
    root = os.path.dirname(os.path.abspath(mapper))
    return {k: os.path.normpath(os.path.join(root, v)) for k, v in entries.items()}


def plan_batches(tasks, batch_size, mode="auto", can_mix=lambda task: True):
    """The batching policy: split a queue of requests, given by their tasks, into batches of indices.

    Returns [(mixed, indices)]. A merged batch holds one task and runs on that task's merged weights,
    at base-model speed per token. A mixed batch holds any tasks and runs unmerged, each row adding its
    own task's low-rank update: slower per token, but a spread-out queue still fills its batches.

      merged  every task in batches of its own.
      mixed   every batch mixed.
      auto    (after dLoRA, OSDI'24) a task with at least `batch_size` requests waiting gets merged
              batches for as many full batches as it fills; everything else (small tasks, remainders)
              is pooled into mixed batches, and a pooled batch that holds one task only runs merged.
              So auto needs no more batches than mixed-only, ceil(len(tasks) / batch_size), and runs
              merged wherever that costs no extra batch: merged for one dominant task, mixed when
              tasks are spread.

    Tasks that cannot be mixed (`can_mix(task)` false: weighted blends) always run merged.
    """
    if mode not in MODES:
        raise LoraError(f"unknown batching mode {mode!r}; use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise LoraError(f"batch_size must be at least 1, got {batch_size}")
    by_task = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)

    def chunks(rows):
        return [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    batches, pool = [], []
    for task, rows in sorted(by_task.items(), key=lambda item: -len(item[1])):  # largest task first
        if mode == "merged" or not can_mix(task):
            batches += [(False, chunk) for chunk in chunks(rows)]
            continue
        if mode == "auto":
            full = len(rows) - len(rows) % batch_size
            batches += [(False, chunk) for chunk in chunks(rows[:full])]
            rows = rows[full:]
        pool += rows  # grouped by task, so each task's rows sit together in the mixed batch
    for chunk in chunks(pool):
        batches.append((mode == "mixed" or len({tasks[i] for i in chunk}) > 1, chunk))
    return batches


def _can_mix(spec):
    """A normalized spec can share a mixed batch if it is the base or one task at weight 1, not a blend."""
    return spec is None or (len(spec) == 1 and spec[0][1] == 1.0)


class MultiTaskModel:
    """A Hugging Face causal LM plus a registry of LoRA task adapters, switched by exact weight rebuilds.

    model: a loaded model (then pass tokenizer) or a name/path for `lora.load_model` ("smollm2-135m").
    mapper: {task: checkpoint} JSON file, dict, or folder of checkpoints. Adapters load lazily into an
    LRU cache of at most `cache_bytes` on the model's device (plus `host_cache_bytes` in CPU memory
    for models on an accelerator). Merged weights of recently used tasks are kept up to
    `merged_cache_bytes` (0: only the active task's; every switch then rebuilds).
    """

    def __init__(self, model, mapper=None, device=None, dtype=None, tokenizer=None,
                 cache_bytes=512 << 20, host_cache_bytes=2 << 30, merged_cache_bytes=2 << 30):
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer = load_model(os.fspath(model), dtype=dtype, device=device or "auto")
        elif tokenizer is None:
            raise LoraError("pass tokenizer= along with a loaded model")
        elif device is not None:
            model.to(device)
        self.pretrained_model, self.tokenizer = model.eval(), tokenizer
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.cache_bytes, self.host_cache_bytes = cache_bytes, host_cache_bytes
        self._registry = {}  # task -> (checkpoint path, token unique to this registration)
        self._cache, self._host_cache = OrderedDict(), OrderedDict()  # task -> Adapter, least recent first
        self.merged_cache_bytes = merged_cache_bytes
        self._targets = {}  # module name -> (parameter, transposed, base weight), see _target
        self._merged = OrderedDict()  # spec key -> {module name: merged weight}, least recent first
        self._pointed = set()  # modules whose parameter holds a merged weight now
        self._active, self._active_key = None, None
        self._fingerprints_ok = set()
        self._lock = threading.RLock()
        for name, path in read_mapper(mapper).items():
            self.add_downstream(name, path)

    # ------------------------------------------------------------------ registry

    @property
    def downstreams(self):
        return list(self._registry)

    @property
    def active(self):
        return self._active

    def add_downstream(self, name, path):
        """Register a task; its checkpoint is read on first use, not now."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise LoraError(f"checkpoint for task {name!r} not found at {path}; check the mapper entry")
        with self._lock:
            if name in self._registry:
                self.remove_downstream(name)
            self._registry[name] = (path, next(_tokens))

    def remove_downstream(self, name):
        with self._lock:
            self._check_names([name])
            if self._active is not None and name in dict(self._active):
                self._switch(None)
            token = self._registry.pop(name)[1]
            self._cache.pop(name, None)
            self._host_cache.pop(name, None)
            for key in [k for k in self._merged if any(t == token for t, _ in k)]:
                del self._merged[key]

    def _check_names(self, names):
        unknown = [n for n in names if n not in self._registry]
        if unknown:
            known = ", ".join(self._registry) or "none registered"
            raise LoraError(f"unknown downstream task {unknown[0]!r}; registered tasks: {known}")

    def adapter(self, name):
        """The task's Adapter on the model's device and dtype, read and validated on first use (LRU cached)."""
        with self._lock:
            self._check_names([name])
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            adapter = self._host_cache.pop(name, None) or self._read(name)
            on_device = adapter if self.device.type == "cpu" else self._to(adapter, self.device)
            self._cache[name] = on_device
            self._evict()
            return on_device

    def _read(self, name):
        path = self._registry[name][0]
        adapter = read_adapter(path)
        expected = adapter.task.get("base_fingerprint") or {}
        key = (expected.get("sha256"), tuple(expected.get("shapes", ())), tuple(adapter.modules))
        if key not in self._fingerprints_ok:
            check_compatible(adapter, self.pretrained_model, self._base_weight)
            self._fingerprints_ok.add(key)
        head = self.pretrained_model.get_output_embeddings()
        for module_name, m in adapter.modules.items():
            weight = self.pretrained_model.get_submodule(module_name).weight
            if m.embedding and head is not None and head.weight is weight:
                raise LoraError(f"task {name!r} adapts {module_name}, whose weight is tied to the output head; "
                                "merging would change the head too, so train it without the embedding")
        if adapter.prompt_format:
            check_prompt_format(adapter.prompt_format, f"prompt format of {path}")
        return self._to(adapter, "cpu")

    def _to(self, adapter, device):
        # fp16 addmm is very slow on CPU; such weights are rebuilt in float32 (see _merge).
        dtype = torch.float32 if (self.dtype == torch.float16 and self.device.type == "cpu") else self.dtype
        adapter.modules = {n: ModuleAdapter(m.A.to(device, dtype), m.B.to(device, dtype), m.scaling, m.embedding)
                           for n, m in adapter.modules.items()}
        return adapter

    def _evict(self):
        pinned = set(dict(self._active or ()))
        while sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
            victim = next((n for n in self._cache if n not in pinned), None)
            if victim is None or victim == next(reversed(self._cache)):
                break
            adapter = self._cache.pop(victim)
            if self.device.type != "cpu":
                self._host_cache[victim] = self._to(adapter, "cpu")
                while sum(a.nbytes for a in self._host_cache.values()) > self.host_cache_bytes:
                    self._host_cache.popitem(last=False)

    # ------------------------------------------------------------------ exact switching (see the module docstring)

    def _normalize(self, spec):
        """None, a task name, or {task: weight} -> None or a sorted tuple of (task, weight)."""
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {spec: 1.0}
        if isinstance(spec, tuple):
            spec = dict(spec)
        if not isinstance(spec, dict) or not spec:
            raise LoraError(f"a downstream is a task name, None, or {{task: weight}}, not {spec!r}")
        self._check_names(list(spec))
        return tuple(sorted((k, float(v)) for k, v in spec.items()))

    def _key(self, spec):
        """What a spec's merged weights depend on: each task's registration (not just its name) and weight."""
        return tuple((self._registry[name][1], weight) for name, weight in spec)

    def _plan(self, spec):
        """{module: (B', A', alpha)} with W = W0 + alpha * B' @ A' in the weight's own layout."""
        parts = {}
        for name, weight in spec:
            for module_name, m in self.adapter(name).modules.items():
                parts.setdefault(module_name, []).append((weight, m))
        plan = {}
        for module_name, items in parts.items():
            if len(items) == 1:
                weight, m = items[0]
                B, A, alpha = m.B, m.A, m.scaling * weight
            else:  # weighted sum of deltas as one low-rank product: [w1 s1 B1 | w2 s2 B2] @ [A1; A2]
                B = torch.cat([m.B * (m.scaling * w) for w, m in items], dim=1)
                A, alpha = torch.cat([m.A for _, m in items], dim=0), 1.0
            plan[module_name] = (A.T, B.T, alpha) if self._target(module_name)[1] else (B, A, alpha)
        return plan

    def _target(self, module_name):
        """(parameter, stored transposed?, base weight) of a module, looked up once, before any switch."""
        if module_name not in self._targets:
            module = self.pretrained_model.get_submodule(module_name)
            self._targets[module_name] = (module.weight, weight_is_transposed(module), module.weight.data)
        return self._targets[module_name]

    def _base_weight(self, module_name):
        if module_name in self._targets:
            return self._targets[module_name][2]
        return self.pretrained_model.get_submodule(module_name).weight

    def _point(self, merged):
        """Point every parameter some task touched at `merged`'s tensor, or at its base weight."""
        for name in self._pointed | merged.keys():
            weight, _, base = self._targets[name]
            weight.data = merged.get(name, base)
        self._pointed = set(merged)

    @staticmethod
    def _merge(out, base, step):
        """out = base + alpha * B @ A, one fused addmm."""
        B, A, alpha = step
        if B.dtype != base.dtype:  # float16 on CPU: rebuilt in float32 (see _to), rounded once
            out.copy_(torch.addmm(base.float(), B, A, alpha=alpha))
        else:
            torch.addmm(base, B, A, alpha=alpha, out=out)

    def _build(self, key, plan):
        """Merged weights for a plan, in the buffers of least recently used tasks where there are some."""
        need = sum(self._target(n)[2].nbytes for n in plan)
        spare = {}
        while self._merged and sum(t.nbytes for m in self._merged.values() for t in m.values()) + need \
                > self.merged_cache_bytes:
            victim_key, victim = self._merged.popitem(last=False)
            if victim_key == self._active_key:  # its buffers are about to be rewritten: run on the base meanwhile
                self._point({})
                self._active, self._active_key = None, None
            spare.update(victim)
        merged = {n: spare.pop(n) if n in spare else torch.empty_like(self._target(n)[2]) for n in plan}
        for name, out in merged.items():
            self._merge(out, self._target(name)[2], plan[name])
        self._merged[key] = merged
        return merged

    @torch.no_grad()
    def _switch(self, spec):
        spec = self._normalize(spec)
        if spec == self._active:
            return
        key = spec and self._key(spec)
        merged = {} if spec is None else self._merged.get(key)
        if merged is None:
            plan = self._plan(spec)  # reads and validates every adapter before anything changes
            previous = self._active
            try:
                merged = self._build(key, plan)
            except BaseException:  # interrupted mid-build: the half-built weights were never pointed at
                if self._active != previous:  # its buffers were being reused: rebuild it
                    self._switch(previous)
                raise
        elif spec is not None:
            self._merged.move_to_end(key)
        self._point(merged)
        self._active, self._active_key = spec, key

    def activate(self, downstream):
        """Switch the base model to a task (None: the plain base; {task: weight}: a weighted sum) and stay."""
        with self._lock:
            self._switch(downstream)

    @contextlib.contextmanager
    def apply_downstream(self, downstream):
        """`with mt.apply_downstream("qa") as model:` the HF model with that task applied, restored after."""
        with self._lock:
            previous = self._active
            self._switch(downstream)
            try:
                yield self.pretrained_model
            finally:
                self._switch(previous)

    # ------------------------------------------------------------------ mixed-task batches

    @contextlib.contextmanager
    def mixed_batch(self, row_tasks):
        """Unmerged mode: row i of every batch uses task row_tasks[i] (None: base) through forward hooks.

        The base output is computed once for the batch and each row gets its own task's low-rank update,
        so one batch can mix tasks (as vLLM, S-LoRA and LoRAX do). Per adapted module the update is
        ((x @ A_all) * row_scale) @ B_all, with every task of the batch stacked along the rank and
        row_scale keeping each row's own rank block (times its scaling) and zeroing the others: three
        kernels per module however many tasks share the batch. Beam search repeats rows.
        """
        with self._lock:
            previous = self._active
            self._switch(None)
            per_module = {}
            for task in dict.fromkeys(t for t in row_tasks if t is not None):
                rows = [i for i, t in enumerate(row_tasks) if t == task]
                for module_name, m in self.adapter(task).modules.items():
                    per_module.setdefault(module_name, []).append((rows, m))
            handles = []
            for module_name, items in per_module.items():
                A = torch.cat([m.A for _, m in items]).T  # (in, total rank)
                B = torch.cat([m.B for _, m in items], dim=1).T  # (total rank, out)
                row_scale = torch.zeros(len(row_tasks), 1, A.shape[1], dtype=A.dtype, device=A.device)
                start = 0
                for rows, m in items:
                    row_scale[rows, :, start:start + m.A.shape[0]] = m.scaling
                    start += m.A.shape[0]
                module = self.pretrained_model.get_submodule(module_name)
                hook = mixed_update_hook(A, B, row_scale, isinstance(module, torch.nn.Embedding))
                handles.append(module.register_forward_hook(hook))
            try:
                yield self.pretrained_model
            finally:
                for h in handles:
                    h.remove()
                self._switch(previous)

    # ------------------------------------------------------------------ generation

    def prompt_for(self, request):
        """The prompt text a request asks for: raw `prompt`, else its task's prompt format filled in."""
        if request.get("prompt") is not None:
            return request["prompt"]
        fmt = request.get("prompt_format")
        if fmt is None:
            spec = self._normalize(request.get("downstream"))
            if spec:
                fmt = self.adapter(max(spec, key=lambda kv: kv[1])[0]).prompt_format
        return format_prompt(fmt or DEFAULT_PROMPT_FORMAT, request.get("instruction", ""), request.get("input", ""))

    def generation_kwargs(self, overrides):
        kwargs = {**GENERATION_DEFAULTS, **overrides}
        if "do_sample" not in overrides and (overrides.get("temperature") or 0) > 0:
            kwargs["do_sample"] = True
        kwargs.setdefault("pad_token_id", pad_token_id(self.tokenizer))
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return kwargs

    @torch.no_grad()
    def generate_batch(self, prompts, **generation_kwargs):
        """Token ids of the prompts, left-padded, through `generate`; returns the new text of each."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        width, pad = max(map(len, ids)), pad_token_id(self.tokenizer)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        out = self.pretrained_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             **self.generation_kwargs(generation_kwargs))
        per_prompt = out.shape[0] // len(prompts)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out][::per_prompt]

    def run_batch(self, prompts, tasks, mixed=False, **generation_kwargs):
        """One batch of prompts, row i for tasks[i]: mixed (unmerged, any tasks) or merged (one task)."""
        with self._lock:
            if mixed:
                self._switch(None)  # so that mixed_batch has no task to restore afterwards
                with self.mixed_batch(tasks):
                    return self.generate_batch(prompts, **generation_kwargs)
            if len(set(tasks)) != 1:
                raise LoraError(f"a merged batch holds one task, not {sorted(set(map(str, tasks)))}")
            self._switch(tasks[0])
            return self.generate_batch(prompts, **generation_kwargs)

    def generate_responses(self, requests, batch_size=16, mode="auto"):
        """Answer many requests in padded batches of up to `batch_size`; answers come back in request order.

        Each request is a dict with `downstream`, `instruction`, `input` (or a raw `prompt`) and optional
        generation settings. `mode` is how tasks share a batch (see `plan_batches`): "merged" (one task
        per batch), "mixed" (any tasks per batch, unmerged) or "auto" (chosen per batch).
        """
        by_settings = {}
        for i, request in enumerate(requests):
            unknown = set(request) - set(REQUEST_KEYS) - {"batch_size"}
            settings = json.dumps({k: request[k] for k in unknown}, sort_keys=True, default=str)
            by_settings.setdefault(settings, []).append(i)
        answers = [None] * len(requests)
        with self._lock:
            specs = [self._normalize(request.get("downstream")) for request in requests]  # fail before any work
            prompts = [self.prompt_for(request) for request in requests]
            for settings, indices in by_settings.items():
                group = [specs[i] for i in indices]
                for mixed, batch in plan_batches(group, batch_size, mode, can_mix=_can_mix):
                    rows = [indices[j] for j in batch]
                    tasks = [specs[i] and specs[i][0][0] if mixed else specs[i] for i in rows]
                    texts = self.run_batch([prompts[i] for i in rows], tasks, mixed, **json.loads(settings))
                    for i, text in zip(rows, texts):
                        answers[i] = text
        return answers

    def generate_response(self, downstream=None, instruction="", input="", **generation_kwargs):
        """The task's answer to one instruction: its prompt format filled in, greedy by default."""
        return self.generate_responses([{"downstream": downstream, "instruction": instruction, "input": input,
                                         **generation_kwargs}])[0]

