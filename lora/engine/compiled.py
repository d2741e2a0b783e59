"""The compiled decode step: the model's forward under torch.compile (inductor), compiled in the background.

Compiling takes minutes on a small CPU, so it never holds up a request: a background thread compiles the
forward for decode steps (one token per running sequence, any batch size and length: `dynamic=True`) on a
scratch KV cache of the same shape as the engine's, while eager steps serve; once `ready` is set the runner
uses it for steps that only decode on plain or merged weights (any other kind of decode step runs eager,
never recompiling on the serving thread). Prompt chunks and mixed-task steps (whose per-token updates are
forward hooks) stay eager. If compiling fails the engine logs why and stays eager.
Parameters are inputs of the compiled graph, not constants (no inductor freezing), so switching a task's
merged weights in never needs a recompile.
The warm-up traces the forward under the tasks' lock, as the runner runs its steps: a mixed step (of this
engine or another over the same model) attaches its forward hooks for the length of its forward, and a trace
that saw them would take them in (or fail on their shapes). The lock is let go while the traced graph is
compiled to code (inductor's minutes), which reads the graph alone, so serving waits on tracing only.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import torch

from .attention import SlotAttention
from .kv_cache import SlotCache

log = logging.getLogger("lora.engine")


def say(line: str) -> None:
    """A progress line on stderr, as `lora serve` prints its own: no logging setup needed to see it."""
    print(line, file=sys.stderr, flush=True)


IDS, POSITION, SLOT, TASK, LENGTH, KEEP = range(6)  # rows of a step's input buffer (see runner)


def decode_step(cache: SlotCache, inputs: torch.Tensor, slots: list[int], length: int) -> dict[str, Any]:
    """The forward's arguments for a step that decodes position `length - 1` of each of `slots` (in order) and
    nothing else, laid out in `inputs` (6, width) as the runner lays out its steps: compiled code is checked
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


class CompiledDecode:
    """torch.compile of `model.forward`, warmed up on decode steps in a background thread until `ready`."""

    def __init__(self, model: Any, cache: SlotCache, inputs: torch.Tensor, lock: threading.RLock,
                 backend: str = "inductor") -> None:
        self._compile_graph = torch._dynamo.lookup_backend(backend)
        self.forward = torch.compile(model.forward, dynamic=True, backend=self._traced)
        self.steps = 0  # steps run compiled
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._model, self._cache, self._inputs, self._lock = model, cache, torch.empty_like(inputs), lock
        self._thread = threading.Thread(target=self._warm_up, name="lora-compile", daemon=True)
        self._thread.start()

    def __call__(self, **inputs: Any) -> Any:
        """One decode step; a kind of step the warm-up did not compile runs eager rather than wait on a compile."""
        self.steps += 1
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.forward(**inputs)

    @property
    def state(self) -> str:
        """"compiling", "ready" (decode steps run compiled) or "failed" (they stay eager; the log says why)."""
        return "ready" if self.ready.is_set() else "failed" if self.error is not None else "compiling"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling ends (True when the compiled step is ready)."""
        self._thread.join(timeout)
        return self.ready.is_set()

    def _traced(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """The backend: compile a graph traced by the warm-up with the tasks' lock let go (see the module doc)."""
        if threading.current_thread() is not self._thread:
            return self._compile_graph(graph, example_inputs)
        self._lock.release()
        try:
            return self._compile_graph(graph, example_inputs)
        finally:
            self._lock.acquire()

    def _warm_up(self) -> None:
        """Compile for every kind of decode step, so that serving never waits on a recompile: one sequence (the
        compiler specialises size 1) in slot 0 or another, several in slots 0..n-1 or with idle slots between
        them, each at two lengths (the first value of a size is specialised, the next makes it dynamic)."""
        start = time.perf_counter()
        say("compiling the decode step in the background (torch.compile; --enforce-eager turns it off); "
            "eager steps serve meanwhile")
        scratch = SlotCache(self._cache.slots, self._cache.max_len)
        kinds = [([0], 2), ([0], 3), ([1], 3), ([0, 1], 3), ([0, 1], 4), ([0, 2], 4), ([0, 2], 5)]
        try:
            with torch.no_grad():
                scratch.reach(8)
                with self._lock:  # eager: fills the scratch cache's layers
                    self._model(**decode_step(scratch, self._inputs, [0], 1))
                for slots, length in kinds:
                    if max(slots) < scratch.slots:
                        with self._lock:  # no other step's hooks on the model while tracing
                            self.forward(**decode_step(scratch, self._inputs, slots, length))
        except Exception as e:  # noqa: BLE001 - the eager step still serves; say why it stays
            self.error = e
            log.warning("compiling the decode step failed, steps stay eager: %s: %s", type(e).__name__, e)
            return
        finally:
            scratch.layers.clear()
        say(f"the compiled decode step is ready ({time.perf_counter() - start:.0f} s)")
        self.ready.set()
