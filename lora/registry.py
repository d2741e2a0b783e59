"""The adapter registry: task name -> checkpoint, read lazily, validated once, kept in byte-bounded LRU caches."""
import itertools
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar, cast

import torch

from .checkpoint import Adapter, ModuleAdapter, check_compatible, read_adapter
from .errors import LoraError
from .files import MAX_JSON_BYTES, read_text
from .gguf_adapter import is_gguf, read_gguf_adapter

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
FLOAT32_MAX = torch.finfo(torch.float32).max
_registrations = itertools.count()


class ByteLRU(Generic[K, V]):
    """An ordered map, least recently used first, that keeps a running total of its values' bytes.

    It never evicts by itself: `evict` drops the least recently used entries the caller can spare and hands
    them back (a device cache moves them to the host, the merged-weights cache reuses their buffers).
    """

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes, self.size = max_bytes, size
        self.nbytes = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def items(self) -> list[tuple[K, V]]:
        """Every entry, least recently used first (looking does not count as a use)."""
        return list(self._items.items())

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None if absent."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        """Add or replace a value as the most recently used (call `evict` to get back within budget)."""
        self.pop(key)
        self._items[key] = value
        self.nbytes += self.size(value)

    def pop(self, key: K) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.nbytes -= self.size(value)
        return value

    def evict(self, need: int = 0, keep: Collection[K] = ()) -> list[tuple[K, V]]:
        """Drop least recently used entries not in `keep` until `need` more bytes fit; returns what was dropped."""
        dropped = []
        for key in list(self._items):
            if self.nbytes + need <= self.max_bytes:
                break
            if key not in keep:
                dropped.append((key, self._items[key]))
                self.pop(key)
        return dropped


def read_mapper(mapper: str | os.PathLike | dict | None) -> dict[str, str]:
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


class Update(NamedTuple):
    """What bounds the size of one module's update scale * B @ A."""
    scale: float
    rank: int
    a_max: float  # max |A|
    b_max: float  # max |B|

    def bound(self, weight: float, limit: float) -> float:
        """An upper bound on |weight * scale * B @ A|'s entries; inf if weight * scale, or weight * scale * B,
        the factors a merge computes, exceed `limit`."""
        scale = abs(weight * self.scale)
        if not (scale <= limit and scale * self.b_max <= limit and self.a_max <= limit):  # also NaN
            return math.inf
        return scale * self.rank * self.a_max * self.b_max


@dataclass(frozen=True)
class Registration:
    path: str
    number: int  # unique to this registration: merged weights built for an earlier one are never reused
    root: str | None  # every file of the checkpoint must lie in this folder (a server's --adapter-root)


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter read and checked against the base model (`Registry.check_adapter`), ready to register."""
    adapter: Adapter  # in float32 on the CPU
    updates: dict[str, Update]


class Registry:
    """Registered tasks and their adapters, read and validated on first use, on the model's device (LRU cached).

    Adapters are kept in float32 (they are small): mixed batches add their update in float32, and merges
    round A and B to the weight's dtype once. Evicted device adapters wait in a host-memory cache.
    `base_weight(module name)` gives a module's untouched base weight (for the base-model fingerprint).
    Not thread-safe by itself: `lora.tasks.Tasks` calls it under its lock.
    """

    def __init__(self, model: torch.nn.Module, base_weight: Callable[[str], torch.Tensor], device: torch.device,
                 cache_bytes: int, host_cache_bytes: int) -> None:
        self.model, self.base_weight, self.device = model, base_weight, device
        self.registrations: dict[str, Registration] = {}
        self.updates: dict[str, dict[str, Update]] = {}  # task -> module -> its update's size, once read
        self.meta: dict[str, dict] = {}  # task -> lora_task.json once read; replaced, never mutated (lock-free reads)
        self.device_cache: ByteLRU[str, Adapter] = ByteLRU(cache_bytes, lambda a: a.nbytes)
        self.host_cache: ByteLRU[str, Adapter] = ByteLRU(host_cache_bytes, lambda a: a.nbytes)
        self._compatible: set[Hashable] = set()

    @property
    def names(self) -> list[str]:
        return list(self.registrations)

    def register(self, name: str, path: str | os.PathLike, root: str | None = None,
                 checked: CheckedAdapter | None = None) -> None:
        """Register a task (replacing one of that name); its checkpoint is read on first use, not now, unless
        it comes `checked` already (then that very adapter is the one used: nothing is read twice)."""
        path = os.fspath(path)
        if root is None and checked is None and not (os.path.isdir(path) or is_gguf(path) and os.path.isfile(path)):
            raise LoraError(f"checkpoint for task {name!r} not found at {path}; check the mapper entry")
        self.unregister(name)
        self.registrations[name] = Registration(path, next(_registrations), root)
        if checked is not None:
            self._store(name, checked)
            self._cache(name, checked.adapter, keep=())  # within cache_bytes like any other: it may leave at once

    def unregister(self, name: str) -> Registration | None:
        """Forget a task and its cached adapter; returns its registration (None if it had none)."""
        self.meta = {task: meta for task, meta in self.meta.items() if task != name}
        self.updates.pop(name, None)
        self.device_cache.pop(name)
        self.host_cache.pop(name)
        return self.registrations.pop(name, None)

    def check(self, names: Collection[str]) -> None:
        unknown = [n for n in names if n not in self.registrations]
        if unknown:
            known = ", ".join(self.registrations) or "none registered"
            raise LoraError(f"unknown downstream task {unknown[0]!r}; registered tasks: {known}")

    def adapter(self, name: str, keep: Collection[str] = ()) -> Adapter:
        """The task's Adapter on the device; making room evicts least recent adapters, except those in keep."""
        self.check([name])
        adapter = self.device_cache.get(name)
        if adapter is not None:
            return adapter
        return self._cache(name, self.host_cache.pop(name) or self._read(name), keep={*keep, name})

    def _cache(self, name: str, adapter: Adapter, keep: Collection[str]) -> Adapter:
        """Put an adapter in the device cache, evicting least recent ones (to host memory on an accelerator)."""
        if self.device.type != "cpu":
            adapter = _moved(adapter, self.device)
        self.device_cache.put(name, adapter)
        for victim, evicted in self.device_cache.evict(keep=keep):
            if self.device.type != "cpu":
                self.host_cache.put(victim, _moved(evicted, "cpu"))
                self.host_cache.evict()
        return adapter

    def _read(self, name: str) -> Adapter:
        registration = self.registrations[name]
        checked = self.check_adapter(self.read(registration.path, registration.root), name)
        self._store(name, checked)
        return checked.adapter

    def read(self, path: str, root: str | None = None) -> Adapter:
        """A task's checkpoint: a PEFT-format folder, or a llama.cpp LoRA adapter file (.gguf)."""
        if is_gguf(path):  # the base's config undoes the rotary row order of files from llama.cpp's converter
            return read_gguf_adapter(path, config=self.model.config, root=root)
        return read_adapter(path, root=root)

    def _store(self, name: str, checked: CheckedAdapter) -> None:
        self.meta = {**self.meta, name: dict(checked.adapter.task)}
        self.updates[name] = checked.updates

    def check_adapter(self, adapter: Adapter, name: str) -> CheckedAdapter:
        """`adapter` checked against the base model (fingerprint, tied head, updates finite in float32) and
        moved to the CPU in float32. Changes nothing here, so it may run in any thread."""
        expected = adapter.task.get("base_fingerprint") or {}
        key = (expected.get("sha256"), tuple(expected.get("shapes", ())), tuple(adapter.modules))
        if key not in self._compatible:
            check_compatible(adapter, self.model, self.base_weight)
            self._compatible.add(key)
        head = cast(Callable[[], torch.nn.Module | None], self.model.get_output_embeddings)()
        config_path = os.path.join(adapter.path, "adapter_config.json")
        updates = {}
        for module_name, m in adapter.modules.items():
            weight = self.model.get_submodule(module_name).weight
            if m.embedding and head is not None and head.weight is weight:
                raise LoraError(f"task {name!r} adapts {module_name}, whose weight is tied to the output head; "
                                "merging would change the head too, so train it without the embedding")
            updates[module_name] = Update(m.scaling, m.A.shape[0], float(m.A.abs().max()), float(m.B.abs().max()))
            if not updates[module_name].bound(1.0, FLOAT32_MAX) <= FLOAT32_MAX:
                raise LoraError(f"{config_path}: lora_alpha (with r, rank_pattern, alpha_pattern, use_rslora) gives "
                                f"{module_name} a scale of {m.scaling:g}, whose update overflows float32; the "
                                "adapter is corrupt, fix lora_alpha or re-train it")
        return CheckedAdapter(_moved(adapter, "cpu"), updates)

    def check_update(self, spec: tuple[tuple[str, float], ...], dtype: torch.dtype) -> None:
        """Raise a LoraError unless the weighted sum of these tasks' updates stays finite in `dtype`, per module.

        Each task's adapter must have been read (`adapter`) first.
        """
        limit = torch.finfo(dtype).max
        total: dict[str, float] = {}
        for name, weight in spec:
            for module_name, update in self.updates[name].items():
                total[module_name] = total.get(module_name, 0.0) + update.bound(weight, limit)
        for module_name, bound in total.items():
            if not bound <= limit:
                weights = ", ".join(f"{name}: {weight:g}" for name, weight in spec)
                raise LoraError(f"the task weights {{{weights}}} make the update of {module_name} overflow "
                                f"{str(dtype).removeprefix('torch.')}; use weights of an ordinary size")


def _moved(adapter: Adapter, device: torch.device | str) -> Adapter:
    """The adapter with A and B in float32 on `device`."""
    adapter.modules = {n: ModuleAdapter(m.A.to(device, torch.float32), m.B.to(device, torch.float32), m.scaling,
                                        m.embedding) for n, m in adapter.modules.items()}
    return adapter
