"""The compiled decode step: the model's forward under torch.compile (inductor), compiled in the background.

Compiling takes minutes on a small CPU, so it never holds up a request: a background thread compiles the
forward for decode steps (one token per running sequence, any batch size and length: STEP_SIZES) on a
scratch KV cache of the same shape as the engine's, while eager steps serve; once `ready` is set the runner
uses it for steps that only decode on plain or merged weights. Decode steps with tasks' per-token updates run
a second graph: the model's module tree with each adapted module wrapped (lora.mixed.slot_tree), whose update
reads the adapter slots' A and B and each row's slot index as inputs, so one graph serves any mix of tasks and a
task taking a slot never recompiles. It is compiled in the background too, when the first such step comes,
once per layout of the slots (which modules they adapt, at what rank). Any kind of decode step not compiled
runs eager, never recompiling on the serving thread; prompt chunks and steps under a blend's forward hooks stay
eager. If compiling fails the engine logs why and those steps stay eager.
Parameters are inputs of the compiled graph, not constants (no inductor freezing), so switching a task's
merged weights in never needs a recompile.
The warm-up traces the model's forward under the tasks' lock, as the runner runs its steps, with no task's
forward hooks on the model (`unhook`): a mixed step of another engine over the same model attaches hooks for the
length of its forward, a quantized base's applied task or blend keeps them on, and a trace that saw them would
take them in. The lock is let go while the traced graph is compiled to code (inductor's minutes), which reads
the graph alone, so serving waits on tracing only. The tree with updates is traced the same way: traced beside
serving steps (which point the shared parameters at other weights) dynamo's analysis diverged.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from ..mixed import AdapterSlots, RowSlots, slot_tree
from .attention import SlotAttention
from .kv_cache import SlotCache

log = logging.getLogger("lora.engine")


def say(line: str) -> None:
    """A progress line on stderr, as `lora serve` prints its own: no logging setup needed to see it."""
    print(line, file=sys.stderr, flush=True)


IDS, POSITION, SLOT, TASK, LENGTH, KEEP, LORA = range(7)  # rows of a step's input buffer (see runner)
KINDS = [([0], 2), ([1], 3), ([0, 1], 3), ([0, 2], 4)]  # slots decoding, length: see _compile
# What differs between two decode steps of one kind: the rows' count (inputs, slot and position of each row, each
# row's task slot), the length attended over (the step's ints and mask), and the task slots' count (it grows).
# These are traced as symbols; the rest (the model's and the KV cache's sizes) are constants of the graph.
STEP_SIZES = ",".join([r"L\['(kwargs|inputs)'\]\['(input_ids|position_ids|logits_to_keep)'\]",
                       r"L\['(kwargs|inputs)'\]\['lora_step'\]\.(n_decode|hi|decode_len|slots|positions|decode_mask)",
                       r".*\.rows\.index", r".*\.weights\.[AB]:0"])


def decode_step(cache: SlotCache, inputs: torch.Tensor, slots: list[int], length: int) -> dict[str, Any]:
    """The forward's arguments for a step that decodes position `length - 1` of each of `slots` (in order) and
    nothing else, laid out in `inputs` (7, width) as the runner lays out its steps: compiled code is checked
    against how its inputs are laid out, so views of one buffer must stay views of one buffer."""
    n, hi = len(slots), max(slots) + 1
    inputs.zero_()
    inputs[SLOT, :n] = torch.tensor(slots)
    inputs[POSITION, :n] = length - 1
    inputs[LENGTH, :hi] = 1  # idle slots attend to position 0 only
    inputs[LENGTH, slots] = length
    inputs[KEEP, :n] = torch.arange(n)
    mask = (torch.arange(length, device=inputs.device)[None, :] < inputs[LENGTH, :hi][:, None])[:, None, None]
    step = SlotAttention(cache, inputs[SLOT, :n], inputs[POSITION, :n], n, hi, hi == n, length, mask, [])
    return dict(input_ids=inputs[IDS, :n][None], position_ids=inputs[POSITION, :n][None], use_cache=False,
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=inputs.device),
                logits_to_keep=inputs[KEEP, :n], lora_step=step)


def run_tree(tree: torch.nn.Module, **inputs: Any) -> Any:
    return tree(**inputs)


class UpdateGraph:
    """The compiled forward of one slot layout, each row adding its own slot's update (-1: none) in the graph.

    torch.compile keeps compiled graphs per code object, at most 8 (recompile_limit), tried one after another on
    each call: compiled from a copy of `run_tree` with a code object of its own, a layout's graphs neither take
    the base step's places nor are tried on its calls (nor its graphs on theirs)."""

    def __init__(self, tree: torch.nn.Module, rows: RowSlots, backend: Callable[..., Any]) -> None:
        own = types.FunctionType(run_tree.__code__.replace(), run_tree.__globals__)
        self.tree, self.rows = tree, rows
        self.forward, self.run = torch.compile(own, dynamic=False, backend=backend), torch._dynamo.run(own)
        self.ready = threading.Event()

    def __call__(self, row_slots: torch.Tensor, **inputs: Any) -> Any:
        """A step: the compiled code, or eager where there is none for it (never a compile)."""
        self.rows.index = row_slots
        return self.run(self.tree, **inputs)

    def compile(self, row_slots: torch.Tensor, **inputs: Any) -> Any:
        self.rows.index = row_slots
        return self.forward(self.tree, **inputs)

    def eager(self, row_slots: torch.Tensor, **inputs: Any) -> Any:
        self.rows.index = row_slots
        return self.tree(**inputs)


class CompiledDecode:
    """torch.compile of `model.forward`, warmed up on decode steps in a background thread until `ready`."""

    def __init__(self, model: Any, cache: SlotCache, inputs: torch.Tensor, lock: threading.RLock,
                 backend: str = "inductor", unhook: Callable[[], None] = lambda: None) -> None:
        self._compile_graph = torch._dynamo.lookup_backend(backend)
        self.forward = torch.compile(model.forward, dynamic=False, backend=self._traced)  # compiles (the warm-up)
        # Serving runs compiled code only, eager where there is none (never a compile on its thread). Per thread,
        # as torch.compiler.set_stance is not: a stance set while serving would stop the warm-up's compiles.
        self._run = torch._dynamo.run(model.forward)
        self.steps = 0  # steps run compiled
        self._graph_runs = 0  # calls of compiled graphs (see _traced)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._model, self._cache, self._inputs, self._lock = model, cache, torch.empty_like(inputs), lock
        self._unhook = unhook
        self._updates: dict[tuple[Any, ...], UpdateGraph | None] = {}  # per slot layout; None: compiling it failed
        self._thread = threading.Thread(target=self._warm_up, name="lora-compile", daemon=True)
        self._thread.start()

    def __call__(self, **inputs: Any) -> Any:
        """One decode step; a kind of step the warm-up did not compile runs eager rather than wait on a compile."""
        return self._counted(self._run, **inputs)

    def _counted(self, forward: Callable[..., Any], **inputs: Any) -> Any:
        """forward(**inputs); `steps` counts the calls that ran compiled code."""
        runs = self._graph_runs
        out = forward(**inputs)
        self.steps += self._graph_runs > runs
        return out

    def with_update(self, table: AdapterSlots, row_slots: torch.Tensor) -> Callable[..., Any] | None:
        """The compiled forward adding each row's task update (`row_slots`: each row's slot in `table`, -1 none),
        or None while it is not compiled: the first step of a slot layout starts compiling it in the background."""
        if not self.ready.is_set():
            return None
        key = (id(table), table.layout, table.capacity > 1)  # a size of 1 is specialised: more slots, another graph
        if key not in self._updates:
            if self._thread.is_alive():  # one compile at a time
                return None
            rows = RowSlots(row_slots.device)
            try:  # on the serving thread: a failure here leaves these steps eager, never fails the step
                new = UpdateGraph(slot_tree(self._model, table, rows), rows, self._traced)
            except Exception as e:  # noqa: BLE001
                log.warning("preparing the decode step with tasks failed, their steps stay eager: %s: %s",
                            type(e).__name__, e)
                self._updates[key] = None
                return None
            # a layout outgrown is not coming back (slots only grow): its tree would keep the old slot tensors alive
            self._updates = {k: v for k, v in self._updates.items() if k[0] != id(table)}
            self._updates[key] = new
            self._thread = threading.Thread(target=self._warm_up_update, args=(key, new), name="lora-compile",
                                            daemon=True)
            self._thread.start()
        graph = self._updates[key]
        if graph is None or not graph.ready.is_set():
            return None
        return functools.partial(self._counted, functools.partial(graph, row_slots))  # eager: the tree still updates

    @property
    def state(self) -> str:
        """"compiling" (a graph is being compiled in the background), "ready" (decode steps run compiled) or
        "failed" (they stay eager; the log says why)."""
        if self._thread.is_alive():
            return "compiling"
        return "ready" if self.ready.is_set() else "failed"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the compile under way ends (True when the compiled step is ready)."""
        self._thread.join(timeout)
        return self.ready.is_set() and not self._thread.is_alive()

    def _traced(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """The backend: compile a graph traced by the warm-up with the tasks' lock let go (see the module doc);
        its calls are counted, so `steps` counts only the steps that ran compiled code."""
        if threading.current_thread() is not self._thread:
            compiled = self._compile_graph(graph, example_inputs)
        else:
            self._lock.release()
            try:
                compiled = self._compile_graph(graph, example_inputs)
            finally:
                self._lock.acquire()

        def run(*args: Any) -> Any:
            self._graph_runs += 1
            return compiled(*args)
        return run

    def _compile(self, forward: Callable[..., Any], eager: Callable[..., Any]) -> float:
        """Compile `forward` for every kind of decode step, so that serving never waits on a recompile: one
        sequence (the compiler specialises size 1) in slot 0 or another, several in slots 0..n-1 or with idle
        slots between them (the attention branches on it). `eager` fills the scratch cache first. Returns the
        seconds it took.

        One trace per kind: STEP_SIZES are symbols from the first trace (a setting of this thread only), and
        only they. Under `dynamic=True` every size was a symbol, each trace took longer, and a length equal to a
        size of the model (2, as 2 kv heads) shared its symbol, so each kind was traced at two lengths."""
        start = time.perf_counter()
        scratch = SlotCache(self._cache.slots, self._cache.max_len)
        try:
            with torch.no_grad(), torch.compiler.config.patch(dynamic_sources=STEP_SIZES):  # type: ignore[attr-defined]
                scratch.reach(8)
                for i, (slots, length) in enumerate([([0], 1), *KINDS]):
                    if max(slots) < scratch.slots:
                        with self._lock:  # no step's hooks on the model while tracing
                            self._unhook()
                            (forward if i else eager)(**decode_step(scratch, self._inputs, slots, length))
        finally:
            scratch.layers.clear()
        return time.perf_counter() - start

    def _warm_up(self) -> None:
        say("compiling the decode step in the background (torch.compile; --enforce-eager turns it off); "
            "eager steps serve meanwhile")
        try:
            seconds = self._compile(self.forward, self._model)
        except Exception as e:  # noqa: BLE001 - the eager step still serves; say why it stays
            self.error = e
            log.warning("compiling the decode step failed, steps stay eager: %s: %s", type(e).__name__, e)
            return
        say(f"the compiled decode step is ready ({seconds:.0f} s)")
        self.ready.set()

    def _warm_up_update(self, key: tuple[Any, ...], graph: UpdateGraph) -> None:
        say("compiling the decode step with tasks' per-token updates in the background; eager steps serve meanwhile")
        try:
            def rows_of(inputs: dict[str, Any]) -> torch.Tensor:
                return self._inputs[LORA, :inputs["input_ids"].shape[1]]
            seconds = self._compile(lambda **inputs: graph.compile(rows_of(inputs), **inputs),
                                    lambda **inputs: graph.eager(rows_of(inputs), **inputs))
        except Exception as e:  # noqa: BLE001 - the eager step still serves; say why it stays
            self._updates[key] = None
            log.warning("compiling the decode step with tasks failed, their steps stay eager: %s: %s",
                        type(e).__name__, e)
            return
        say(f"the compiled decode step with tasks is ready ({seconds:.0f} s)")
        graph.ready.set()
