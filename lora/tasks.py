"""Tasks: one base model and its registered LoRA tasks, applied exactly (merged weights) or per token (mixed).

Over a quantized base (lora.quant) packed weights cannot take a merged task: there `merges` is False and a task
applied to the whole model (activate, apply_downstream) is its low-rank update added to each layer's output
by forward hooks, the per-token update mixed batches use. The base weights are never written either way.
"""
import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import Adapter
from .errors import LoraError
from .hooked import HookedUpdate
from .mixed import AdapterSlots, MixedAdapters
from .models import load_model
from .quant import is_quantized, quantize_model, serving_head
from .registry import CheckedAdapter, Registry, read_mapper
from .switch import Key, Spec, Switch

Downstream = str | dict[str, float] | Spec | None  # a task name, {task: weight} (a blend), or None (the base)


@dataclass(frozen=True)
class CacheInfo:
    """What is cached now; every list runs from the least to the most recently used."""
    active: Spec | None  # the task (or blend) whose merged weights the model runs on; None: the base weights
    device: list[str]  # tasks whose adapters are on the model's device
    device_bytes: int
    host: list[str]  # tasks whose adapters wait in CPU memory (models on an accelerator)
    host_bytes: int
    merged: list[Spec]  # tasks and blends whose merged weights are kept
    merged_bytes: int


class Tasks:
    """A Hugging Face causal LM plus a registry of LoRA task adapters, switched by exact weight rebuilds.

    model: a loaded model (then pass tokenizer) or a name/path for `lora.load_model` ("smollm2-135m").
    mapper: {task: checkpoint} JSON file, dict, or folder of checkpoints. Adapters load lazily into an
    LRU cache of at most `cache_bytes` on the model's device (plus `host_cache_bytes` in CPU memory
    for models on an accelerator). Merged weights of recently used tasks are kept up to
    `merged_cache_bytes` (0: only the active task's; every switch then rebuilds). Mixed batches compute
    each token's update in `update_dtype`. `quantize` (nf4, fp4, int8, w8a16, w4a16; with `double_quant`,
    `compute_dtype`) quantizes the base's linear layers (a loaded model's in place), see lora.quant; w8a16 and
    w4a16 quantize the output head too unless `quantize_head` is False (lora.quant.serving_head).
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike, mapper: str | os.PathLike | dict | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 tokenizer: object = None, cache_bytes: int = 512 << 20, host_cache_bytes: int = 2 << 30,
                 merged_cache_bytes: int = 2 << 30, update_dtype: torch.dtype = torch.float32,
                 quantize: str | None = None, double_quant: bool = False, compute_dtype: str | None = None,
                 quantize_head: bool | None = None) -> None:
        hf_model: torch.nn.Module
        head = serving_head(quantize, quantize_head)
        if isinstance(model, (str, os.PathLike)):
            hf_model, tokenizer = load_model(os.fspath(model), dtype=dtype, device=device or "auto", quantize=quantize,
                                             double_quant=double_quant, compute_dtype=compute_dtype, quantize_head=head)
        elif not isinstance(model, torch.nn.Module):
            raise LoraError(f"model is a loaded model or a model's name or path, not {type(model).__name__}")
        elif tokenizer is None:
            raise LoraError("pass tokenizer= along with a loaded model")
        else:
            hf_model = model if device is None else model.to(device)
            if quantize is not None:
                quantize_model(hf_model, quantize, double_quant, compute_dtype, head=head)
        self.pretrained_model, self.tokenizer = hf_model.eval(), tokenizer
        # Packed weights cannot take a merged task: then a task applies as forward hooks (see the module's doc).
        self.merges = not any(is_quantized(m) for m in hf_model.modules())
        self._hooks = contextlib.ExitStack()  # the applied task's hooks where the base does not merge
        self._hooked: Spec | None = None
        first = next(hf_model.parameters())
        self.device, self.dtype, self.update_dtype = first.device, first.dtype, update_dtype
        self.switch = Switch(hf_model, merged_cache_bytes)
        self.registry = Registry(hf_model, self.switch.base_weight, self.device, cache_bytes, host_cache_bytes)
        self.lock = threading.RLock()  # held by whoever changes or runs the weights: a switch, an engine step
        self.slots: AdapterSlots | None = None  # adapters of mixed batches (see mix)
        for name, path in read_mapper(mapper).items():
            self.add_downstream(name, path)

    # ------------------------------------------------------------------ registry

    @property
    def downstreams(self) -> list[str]:
        return self.registry.names

    @property
    def registrations(self) -> tuple[int, ...]:
        """One number per registration, new for every add_downstream: what was computed with a task's weights
        (merged weights, an engine's cached K/V) belongs to its registration, not to its name."""
        return tuple(r.number for r in self.registry.registrations.values())

    @property
    def active(self) -> Spec | None:
        """The task (or blend) applied now, in `normalize`'s form; None for the base model."""
        return self.switch.active_spec if self.merges else self._hooked

    def add_downstream(self, name: str, path: str | os.PathLike, root: str | None = None,
                       checked: CheckedAdapter | None = None) -> None:
        """Register a task (replacing one of that name); its checkpoint is read on first use, not now.

        root: a folder every file of the checkpoint must lie in when it is opened, also on a re-read after
        the adapter left the cache (a server's --adapter-root).
        checked: the adapter as `check_adapter` returned it: registered as it is, not read again.
        """
        with self.lock:
            if name in self.registry.registrations:
                self.remove_downstream(name)
            self.registry.register(name, path, root, checked)

    def check_adapter(self, path: str | os.PathLike, root: str | None = None) -> CheckedAdapter:
        """Read a checkpoint and check it against the base model without registering it; no lock is taken, so
        a server does this in a worker thread and then registers the result between two engine steps."""
        path = os.fspath(path)
        return self.registry.check_adapter(self.registry.read(path, root), os.path.basename(path))

    def remove_downstream(self, name: str) -> None:
        with self.lock:
            self.registry.check([name])
            if name in dict(self.active or ()):
                self._switch(None)
            registration = self.registry.unregister(name)
            if registration is not None:
                self.switch.forget(registration.number)

    def adapter(self, name: str) -> Adapter:
        """The task's Adapter on the model's device, in float32, read and validated on first use (LRU cached)."""
        with self.lock:
            return self.registry.adapter(name, keep=dict(self.active or ()))

    def task_meta(self, name: str) -> dict:
        """The task's lora_task.json (prompt format, chat template use, ...); {} for PEFT's adapters."""
        meta = self.registry.meta.get(name)
        return dict(meta) if meta is not None else dict(self.adapter(name).task)

    def cache_info(self) -> CacheInfo:
        """What is cached now: adapters on the device and in CPU memory, merged weights, the active task."""
        with self.lock:
            registry, merged = self.registry, self.switch.cache
            return CacheInfo(self.active, list(registry.device_cache), registry.device_cache.nbytes,
                             list(registry.host_cache), registry.host_cache.nbytes,
                             [m.spec for _, m in merged.items()], merged.nbytes)

    # ------------------------------------------------------------------ exact switching (see lora.switch)

    def normalize(self, spec: Downstream) -> Spec | None:
        """None, a task name, or {task: weight} -> None or a sorted tuple of (task, weight)."""
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {spec: 1.0}
        if isinstance(spec, tuple):
            spec = dict(spec)
        if not isinstance(spec, dict) or not spec:
            raise LoraError(f"a downstream is a task name, None, or {{task: weight}}, not {spec!r}")
        self.registry.check(list(spec))
        weights = {}
        for name, weight in spec.items():
            try:
                weights[name] = float(weight)
            except (TypeError, ValueError):
                weights[name] = math.nan
            if not math.isfinite(weights[name]):
                raise LoraError(f"the weight of task {name!r} must be a finite number, got {weight!r}")
        return tuple(sorted(weights.items()))

    def _merged_key(self, spec: Spec) -> Key:
        """What a spec's merged weights depend on: each task's registration (not just its name) and weight."""
        return tuple((self.registry.registrations[name].number, weight) for name, weight in spec)

    @torch.no_grad()
    def _switch(self, downstream: Downstream) -> None:
        spec = self.normalize(downstream)
        if spec == self.active:
            return
        if not self.merges:
            self._hook(spec)
            return
        if spec is None:
            self.switch.point(None, None)
            return
        key = self._merged_key(spec)
        merged = self.switch.cached(key)
        if merged is None:
            keep = {*dict(spec), *dict(self.active or ())}
            parts = [(weight, self.registry.adapter(name, keep)) for name, weight in spec]  # read and validated
            self.registry.check_update(spec, torch.float32)  # ... before anything changes
            plan = self.switch.plan(parts)
            previous = self.active
            try:
                merged = self.switch.build(key, spec, plan)
            except BaseException:  # interrupted mid-build: the half-built weights were never pointed at
                if self.active != previous:  # its buffers were being reused: rebuild it
                    self._switch(previous)
                raise
        self.switch.point(key, merged)

    def _hook(self, spec: Spec | None) -> None:
        """Over a quantized base: the task's (or blend's) update added to every token by forward hooks."""
        self._hooks.close()
        self._hooked = None
        if spec is None:
            return
        keep = dict(spec)
        parts = [(weight, self.registry.adapter(name, keep)) for name, weight in spec]  # read and validated
        self.registry.check_update(spec, self.update_dtype)
        self._hooks.enter_context(HookedUpdate(self.pretrained_model, parts, self.update_dtype).attached())
        self._hooked = spec

    def activate(self, downstream: Downstream) -> None:
        """Switch the base model to a task (None: the plain base; {task: weight}: a weighted sum) and stay.

        Merged weights, or over a quantized base (`merges` False) forward hooks adding the task's update."""
        with self.lock:
            self._switch(downstream)

    @contextlib.contextmanager
    def apply_downstream(self, downstream: Downstream) -> Iterator[torch.nn.Module]:
        """`with tasks.apply_downstream("qa") as model:` the HF model with that task applied, restored after."""
        with self.lock:
            previous = self.active
            self._switch(downstream)
            try:
                yield self.pretrained_model
            finally:
                self._switch(previous)

    # ------------------------------------------------------------------ mixed-task batches (see lora.mixed)

    @staticmethod
    def can_mix(spec: Spec | None) -> bool:
        """A normalized spec can share a mixed batch if it is the base or one task at weight 1, not a blend."""
        return spec is None or (len(spec) == 1 and spec[0][1] == 1.0)

    def mix(self, tasks: list[str], max_loras: int | None = None) -> MixedAdapters:
        """Per-token updates for a set of tasks, attached per forward (see lora.mixed.MixedAdapters).

        Each task takes one of `max_loras` preallocated adapter slots (more when a call needs more), read and
        checked when it first takes one; tasks already in a slot cost nothing. Run them over the base
        weights: `tasks.activate(None)`, `.select(index)`, then `with .attached():`.
        """
        with self.lock:
            capacity = max(max_loras or 1, len(tasks))
            if self.slots is None:
                self.slots = AdapterSlots(self.pretrained_model, self.update_dtype, capacity)
            elif capacity > self.slots.capacity:
                self.slots.resize(capacity)
            self._acquire(tasks)
            return MixedAdapters(self.slots, tasks, self._acquire)

    def _acquire(self, tasks: Sequence[str]) -> list[int]:
        """Each task's adapter slot, reading and checking those not in one."""
        with self.lock:
            self.registry.check(list(tasks))
            assert self.slots is not None
            keys = [(name, self.registry.registrations[name].number) for name in tasks]
            return self.slots.acquire(keys, self._read_checked)

    def _read_checked(self, name: str) -> Adapter:
        adapter = self.registry.adapter(name, keep={name, *dict(self.active or ())})
        self.registry.check_update(((name, 1.0),), self.update_dtype)
        return adapter
