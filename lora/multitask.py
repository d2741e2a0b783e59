"""One base model, many task adapters: a lazy adapter registry, exact weight swapping, and mixed-task hooks.

The base weights are never written. Applying a task builds its merged weights W = W0 + s * B @ A
in separate tensors, one fused addmm per weight, and points each targeted parameter at them;
going back points them at W0 again. Nothing is ever subtracted, so any sequence of switches leaves
bitwise the weights a single switch would, in any dtype. The most recently used tasks keep their
merged weights (`merged_cache_bytes`, 2 GiB by default, at least the active task's), so switching
among them copies nothing; a switch to another task builds only the layers that task targets, in
new buffers or, once the cache is full, in those of the least recently used task.
Generation runs through `lora.engine.Engine`; `generate_response(s)` here are shortcuts to it.
"""
import contextlib
import itertools
import json
import os
import threading
from collections import OrderedDict

import torch

from .checkpoint import ModuleAdapter, check_compatible, read_adapter
from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text
from .layers import mixed_update_hook, weight_is_transposed
from .models import load_model

REQUEST_KEYS = {"downstream", "instruction", "input", "prompt", "messages", "prompt_format"}
# generate_response's settings, named as transformers' generate names them, and what the engine calls them
GENERATION_KEYS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                   "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "stop_strings": "stop",
                   "ignore_eos": "ignore_eos"}
_tokens = itertools.count()


def read_mapper(mapper):
    """{task: checkpoint dir} from a JSON file (paths relative to it), a dict, or a folder of checkpoints."""
    if mapper is None:
        return {}
    if isinstance(mapper, dict):
        return {str(k): os.fspath(v) for k, v in mapper.items()}
    mapper = os.fspath(mapper)
    if os.path.isdir(mapper):
        return {e.name.removesuffix(".gguf"): e.path for e in sorted(os.scandir(mapper), key=lambda e: e.name)
                if e.is_dir() and os.path.exists(os.path.join(e.path, "adapter_config.json"))
                or e.is_file() and e.name.endswith(".gguf")}
    try:
        entries = json.loads(read_text(mapper, what="checkpoint mapper", max_bytes=MAX_JSON_BYTES))
    except (ValueError, RecursionError) as e:
        raise LoraError(f"checkpoint mapper {mapper} is not valid JSON ({e})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise LoraError(f"checkpoint mapper {mapper} must be a JSON object {{task name: checkpoint directory}}")
    root = os.path.dirname(os.path.abspath(mapper))
    return {k: os.path.normpath(os.path.join(root, v)) for k, v in entries.items()}


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
        self._registry = {}  # task -> (checkpoint path, token unique to this registration, adapter root or None)
        self._meta = {}  # task -> its lora_task.json, once read: readable from any thread without the lock
        self._cache, self._host_cache = OrderedDict(), OrderedDict()  # task -> Adapter, least recent first
        self.merged_cache_bytes = merged_cache_bytes
        self._targets = {}  # module name -> (parameter, transposed, base weight), see _target
        self._merged = OrderedDict()  # spec key -> {module name: merged weight}, least recent first
        self._pointed = set()  # modules whose parameter holds a merged weight now
        self._active, self._active_key = None, None
        self._fingerprints_ok = set()
        self.lock = threading.RLock()  # held by whoever changes or runs the weights: a switch, an engine step
        for name, path in read_mapper(mapper).items():
            self.add_downstream(name, path)

    # ------------------------------------------------------------------ registry

    @property
    def downstreams(self):
        return list(self._registry)

    @property
    def active(self):
        return self._active

    def add_downstream(self, name, path, root=None):
        """Register a task; its checkpoint is read on first use, not now.

        root: a folder every file of the checkpoint must lie in when it is opened, also on a re-read after
        the adapter left the cache (a server's --adapter-root).
        """
        path = os.fspath(path)
        if root is None and not (os.path.isdir(path) or path.endswith(".gguf") and os.path.isfile(path)):
            raise LoraError(f"checkpoint for task {name!r} not found at {path}; check the mapper entry")
        with self.lock:
            if name in self._registry:
                self.remove_downstream(name)
            self._registry[name] = (path, next(_tokens), root)

    def remove_downstream(self, name):
        with self.lock:
            self._check_names([name])
            if self._active is not None and name in dict(self._active):
                self._switch(None)
            token = self._registry.pop(name)[1]
            self._meta = {task: meta for task, meta in self._meta.items() if task != name}
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
        with self.lock:
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
        path, _, root = self._registry[name]
        adapter = read_adapter(path, root=root)
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
        self._meta = {**self._meta, name: dict(adapter.task)}
        return self._to(adapter, "cpu")

    def _to(self, adapter, device):
        # Kept in float32 (adapters are small): mixed batches add their update in float32, and merges
        # round A and B to the weight's dtype once (see _plan).
        adapter.modules = {n: ModuleAdapter(m.A.to(device, torch.float32), m.B.to(device, torch.float32), m.scaling,
                                            m.embedding) for n, m in adapter.modules.items()}
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

    def normalize(self, spec):
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
            # fp16 addmm is very slow on CPU; such weights are rebuilt in float32 (see _merge).
            base = self._target(module_name)[2]
            dtype = torch.float32 if base.dtype == torch.float16 and base.device.type == "cpu" else base.dtype
            B, A = B.to(dtype), A.to(dtype)
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
        spec = self.normalize(spec)
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
        with self.lock:
            self._switch(downstream)

    @contextlib.contextmanager
    def apply_downstream(self, downstream):
        """`with mt.apply_downstream("qa") as model:` the HF model with that task applied, restored after."""
        with self.lock:
            previous = self._active
            self._switch(downstream)
            try:
                yield self.pretrained_model
            finally:
                self._switch(previous)

    # ------------------------------------------------------------------ mixed-task batches

    @staticmethod
    def can_mix(spec):
        """A normalized spec can share a mixed batch if it is the base or one task at weight 1, not a blend."""
        return spec is None or (len(spec) == 1 and spec[0][1] == 1.0)

    def mix(self, tasks):
        """Unmerged mode's hooks for a set of tasks, built once and attached per forward (see MixedAdapters).

        Run them over the base weights: `mt.activate(None)`, `.select(index)`, then `with .attached():`.
        """
        with self.lock:
            return MixedAdapters(self.pretrained_model, tasks, [self.adapter(t) for t in tasks])

    @contextlib.contextmanager
    def mixed_batch(self, row_tasks):
        """`with mt.mixed_batch(["qa", None, "sum"]) as model:` row i of every batch uses task row_tasks[i].

        The base output is computed once and each row gets its own task's low-rank update, so one batch
        can mix tasks (as vLLM, S-LoRA and LoRAX do); the weights are as before afterwards.
        """
        with self.lock:
            previous = self._active
            tasks = sorted({t for t in row_tasks if t is not None})
            mixed = self.mix(tasks)
            mixed.select(torch.tensor([0 if t is None else tasks.index(t) + 1 for t in row_tasks],
                                      device=self.device)[:, None])
            self._switch(None)
            try:
                with mixed.attached():
                    yield self.pretrained_model
            finally:
                self._switch(previous)

    # ------------------------------------------------------------------ generation, through lora.engine

    def task_meta(self, name):
        """The task's lora_task.json (prompt format, chat template use, ...); {} for PEFT's adapters."""
        meta = self._meta.get(name)
        return dict(meta) if meta is not None else dict(self.adapter(name).task)

    def prompt_ids(self, request):
        """The prompt token ids of a request dict, rendered as its task was trained (see lora.prompts)."""
        from .prompts import prompt_ids

        spec = self.normalize(request.get("downstream"))
        meta = self.task_meta(max(spec, key=lambda kv: kv[1])[0]) if spec else None
        return prompt_ids(self.tokenizer, meta, instruction=request.get("instruction", ""),
                          input=request.get("input", ""), messages=request.get("messages"),
                          prompt=request.get("prompt"), prompt_format=request.get("prompt_format"))

    def generate_responses(self, requests, batch_size=16, mode="auto"):
        """Answer many requests with continuous batching; answers come back in request order.

        Each request is a dict with `downstream`, `instruction`, `input` (or a raw `prompt`, or chat
        `messages`) and optional settings named as transformers' generate names them: max_new_tokens
        (256), min_new_tokens, temperature (0: greedy), top_p, top_k, seed, stop. `mode` is how tasks
        share a step (see lora.engine.Engine): "auto", "merged" or "mixed".
        """
        from .engine import Engine

        context = getattr(self.pretrained_model.config, "max_position_embeddings", None) or 4096
        with self.lock:
            prompts, tasks, sampling = [], [], []
            for request in requests:
                unknown = sorted(set(request) - REQUEST_KEYS - set(GENERATION_KEYS))
                if unknown:
                    raise LoraError(f"unknown generation setting {unknown[0]!r}; use {', '.join(GENERATION_KEYS)}")
                prompts.append(self.prompt_ids(request))
                tasks.append(request.get("downstream"))
                sampling.append(sampling_params(request, room=context - len(prompts[-1])))
            longest = max((len(p) + s.max_tokens for p, s in zip(prompts, sampling)), default=1)
            engine = Engine(self, max_num_seqs=batch_size, max_model_len=min(longest, context), mode=mode)
            return [out.text.strip() for out in engine.generate(prompts, tasks, sampling)]

    def generate_response(self, downstream=None, instruction="", input="", **generation_kwargs):
        """The task's answer to one instruction: its prompt format filled in, greedy by default."""
        return self.generate_responses([{"downstream": downstream, "instruction": instruction, "input": input,
                                         **generation_kwargs}])[0]


def sampling_params(request, room):
    """A request's generate-style settings as the engine's SamplingParams; by default the answer may
    take 256 tokens, or what is left of the model's context (`room`) if that is less."""
    from .engine import SamplingParams

    settings = {GENERATION_KEYS[k]: v for k, v in request.items() if k in GENERATION_KEYS}
    settings.setdefault("max_tokens", max(1, min(256, room)))
    return SamplingParams(**settings)


class MixedAdapters:
    """Forward hooks adding to each token the low-rank update of its own task, over the base weights.

    Per adapted module every task's A and B are stacked along the rank, in float32 (so bfloat16 and
    float16 models round the update once, not per factor), and a (tasks + 1, rank) table holds each
    task's scaling on its own rank block: selecting a table row per token keeps that task's update and
    zeroes the others, in three kernels per module however many tasks share the batch.
    """

    def __init__(self, model, tasks, adapters):
        self.tasks, self.index = tuple(tasks), None
        per_module = {}
        for i, adapter in enumerate(adapters, 1):
            for name, m in adapter.modules.items():
                per_module.setdefault(name, []).append((i, m))
        self._hooks = []
        for name, items in per_module.items():
            A = torch.cat([m.A.float() for _, m in items]).T  # (in, total rank)
            B = torch.cat([m.B.float() for _, m in items], dim=1).T  # (total rank, out)
            scales = torch.zeros(len(self.tasks) + 1, A.shape[1], device=A.device)
            start = 0
            for i, m in items:
                scales[i, start:start + m.A.shape[0]] = m.scaling
                start += m.A.shape[0]
            module = model.get_submodule(name)
            self._hooks.append((module, mixed_update_hook(A, B, scales, self, isinstance(module, torch.nn.Embedding))))

    def select(self, index):
        """Which task each token (or row) uses from now on: 0 for the base, i + 1 for tasks[i]."""
        self.index = index

    @contextlib.contextmanager
    def attached(self):
        """The hooks on the model for one forward (or one `with` block), and never left behind."""
        handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
