"""The model runner: a step's inputs, the task policy, one forward, and the sampled rows' next tokens.

Inputs are laid out on the host in one persistent buffer (pinned on a GPU) and copied to the device in one
copy; the only device-to-host transfer of a step is its sampled tokens (with a finite-logits flag per row),
plus the log-probabilities in steps where a request asked for them. Constrained rows are masked by their
grammars (built on the host) before sampling; log-probabilities are taken after the mask, before sampling.
Tasks: when every request of a step uses one task it runs on that task's merged weights, at base-model
speed; otherwise on the base weights plus each token's own task's low-rank update (S-LoRA / Punica style,
`tasks.mix`). Going back to merged waits for `merge_after` steps of one task, so a stream of mixed
requests cannot make it thrash. If a step fails (an exception, or logits that are not finite), it is run
again one task at a time, so only the requests of the task at fault fail.
"""
from __future__ import annotations

import contextlib
import math
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import LoraError
from ..logprobs import TokenLogprobs, token_logprobs
from ..mixed import AdapterSlots
from ..structured import apply_masks
from . import sampler
from .attention import ATTENTION, ChunkRows, DecodeRow, SlotAttention
from .compiled import IDS, KEEP, LENGTH, LORA, POSITION, SLOT, TASK, CompiledDecode
from .kv_cache import SlotCache
from .lean import LeanForward
from .packed import PackedLinears
from .request import Request, Spec
from .scheduler import StepPlan


class MixedTasks(Protocol):
    """tasks.mix()'s result: per-token updates of several tasks over the base weights."""
    tasks: tuple[str, ...]

    def select(self, index: torch.Tensor) -> None: ...

    def attached(self) -> AbstractContextManager[None]: ...

    @property
    def table(self) -> AdapterSlots: ...

    @property
    def token_slots(self) -> torch.Tensor: ...


class Tasks(Protocol):
    """What the engine runs on (lora.tasks.Tasks, MultiTaskModel): a base model and its task adapters."""
    pretrained_model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    lock: threading.RLock
    merges: bool  # False over a quantized base: a task applies as its per-token update, never merged weights

    @property
    def downstreams(self) -> list[str]: ...

    @property
    def registrations(self) -> tuple[int, ...]: ...

    def normalize(self, spec: Any) -> Spec: ...

    def can_mix(self, spec: Spec) -> bool: ...

    def mix(self, tasks: list[str], max_loras: int | None = None) -> MixedTasks: ...

    def activate(self, spec: Spec) -> None: ...


class NonFinite(LoraError):
    """A step's logits for a request were inf or NaN: its task's update overflows."""


def non_finite(request: Request, dtype: torch.dtype) -> NonFinite:
    where = f"task {request.spec[0][0]!r}" if request.spec else "the base model"
    dtype_name = str(dtype).removeprefix("torch.")
    return NonFinite(f"{where} produced logits that are not finite (inf or NaN) in {dtype_name}: its adapter's "
                     "update overflows; check the adapter's scaling and weights, or retrain it")


@dataclass
class Layout:
    """Where a step's rows went in the input buffer."""
    decode: list[Request]  # in slot order: rows [0, len(decode))
    sampled: list[Request]  # the rows whose logits are kept, in order
    chunks: list[ChunkRows]
    n: int  # rows in all
    hi: int  # decode rows attend over slots [0, hi)
    reach: int  # the cache positions the step reaches
    echo: list[Echo] = field(default_factory=list)  # prompt rows whose logits are kept too, after the sampled ones
    kept: int = 0  # logits rows kept in all


@dataclass
class Echo:
    """A chunk's prompt positions [start, end) whose logits score the prompt's next tokens (prompt logprobs)."""
    request: Request
    start: int
    end: int
    row: int  # the input buffer's row of position start


@dataclass
class Sampled:
    """What a step gives one request: its next token (None: none this step), and the log-probabilities asked for."""
    token: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


StepResult = dict[Request, "Sampled | BaseException"]  # each sampled or echoed request's result, or its error


class ModelRunner:
    """Runs StepPlans on the model; keeps the task policy's state between steps."""

    def __init__(self, tasks: Tasks, cache: SlotCache, eos: list[int], *, max_tokens: int, mode: str,
                 merge_after: int, max_loras: int | None = None, enforce_eager: bool = True,
                 compile_backend: str = "inductor", prepack_weights: bool = False) -> None:
        self.tasks, self.model, self.cache = tasks, tasks.pretrained_model, cache
        self.device, self.mode, self.merge_after, self.max_loras = tasks.device, mode, merge_after, max_loras
        self.model.set_attn_implementation(ATTENTION)
        on_gpu = self.device.type != "cpu"
        self._host = torch.zeros(7, max(max_tokens, cache.slots), dtype=torch.long, pin_memory=on_gpu)
        self._rows = self._host.numpy()
        self._device = torch.empty_like(self._host, device=self.device) if on_gpu else self._host
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        self._params = sampler.ParamBuffer(cache.slots, self.device)
        # A 4D mask is taken as given: transformers then builds none of its own (this attention needs none), and
        # skips its packed-sequence check, which would sync the host with the GPU at every forward.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._mixed: MixedTasks | None = None
        self._merged_steps = 0
        self._spec: Spec = None
        self.packed = PackedLinears(self.model) if prepack_weights else None
        self.lean = LeanForward(self.model)
        self.compiled = None if enforce_eager else CompiledDecode(self.model, cache, self._device, tasks.lock,
                                                                    compile_backend, self._unhook)

    def execute(self, plan: StepPlan) -> StepResult:
        """Each sampled request's next token; requests of a failing task get their error instead."""
        try:
            results = self._run(plan)
        except Exception as e:  # noqa: BLE001 - a fault of one task must not fail the others
            if len(plan.specs) == 1:
                return {r: e for r in plan.requests}
            return self._one_task_at_a_time(plan)
        if len(plan.specs) > 1 and any(isinstance(v, NonFinite) for v in results.values()):
            return self._one_task_at_a_time(plan)  # one task's overflow may have reached its neighbours
        return results

    def _one_task_at_a_time(self, plan: StepPlan) -> StepResult:
        results: StepResult = {}
        for spec in sorted(plan.specs, key=str):
            part = plan.only(spec)
            try:
                results.update(self._run(part))
            except Exception as e:  # noqa: BLE001 - handed to this task's requests
                results.update({r: e for r in part.requests})
        return results

    def _lay_out(self, plan: StepPlan) -> Layout:
        """Write the step's rows into the host buffer: decode rows in slot order, then prompt chunks."""
        rows, decode = self._rows, sorted(plan.decode, key=lambda r: r.slot)
        n = len(decode)
        for i, r in enumerate(decode):
            rows[IDS, i], rows[POSITION, i], rows[SLOT, i] = r.tokens[-1], len(r.prompt) + len(r.tokens) - 1, r.slot
        hi = max((r.slot for r in decode), default=-1) + 1
        rows[LENGTH, :hi] = 1  # idle slots attend to position 0 only
        rows[LENGTH, rows[SLOT, :n]] = rows[POSITION, :n] + 1
        rows[KEEP, :n] = np.arange(n)
        layout = Layout(decode, list(decode), [], n, hi, int(rows[POSITION, :n].max(initial=0)) + 1)
        for c in plan.chunks:
            end = layout.n + c.end - c.start
            rows[IDS, layout.n:end] = c.request.prompt[c.start:c.end]
            rows[POSITION, layout.n:end] = np.arange(c.start, c.end)
            rows[SLOT, layout.n:end] = c.request.slot
            causal = torch.arange(c.end, device=self.device)[None, :] <= torch.arange(c.start, c.end,
                                                                                       device=self.device)[:, None]
            layout.chunks.append(ChunkRows(layout.n, end, c.request.slot, c.end, causal))
            if c.end == len(c.request.prompt) and c.request.sampling.max_tokens > 0:
                rows[KEEP, len(layout.sampled)] = end - 1
                layout.sampled.append(c.request)
            if c.request.echo:  # positions up to the prompt's last but one predict a prompt token
                layout.echo.append(Echo(c.request, c.start, min(c.end, len(c.request.prompt) - 1), layout.n))
            layout.n, layout.reach = end, max(layout.reach, c.end)
        layout.kept = len(layout.sampled)
        for e in layout.echo:
            rows[KEEP, layout.kept:layout.kept + e.end - e.start] = np.arange(e.row, e.row + e.end - e.start)
            layout.kept += e.end - e.start
        return layout

    @torch.no_grad()
    def _run(self, plan: StepPlan) -> StepResult:
        """One forward over the plan and its sampled rows' tokens: one copy in, one transfer out."""
        layout = self._lay_out(plan)
        n, hi, sampled = layout.n, layout.hi, layout.sampled
        with self.tasks.lock:
            mixed = self._policy(layout.decode + [c.request for c in plan.chunks], [1] * len(layout.decode) +
                                 [c.end - c.start for c in plan.chunks])
            if mixed is not None:
                mixed.select(self._host[TASK, :n][None])  # tokens are grouped by task on the host
            forward = self._compiled(plan, mixed, n)
            width = max(n, hi, layout.kept)
            if self._device is not self._host:
                self._device[:, :width].copy_(self._host[:, :width], non_blocking=True)
            inputs = self._device
            decode_len = int(self._rows[LENGTH, :hi].max(initial=1))
            # on a CPU an eager step's decode rows attend each over its own length (see attention); a compiled
            # step keeps the one batched attention it was traced with (no recompile)
            rows = [DecodeRow(r.slot, len(r.prompt) + len(r.tokens)) for r in layout.decode] \
                if self.device.type == "cpu" and forward is None else None
            mask = None
            if hi and rows is None:  # the batched attention's mask
                lengths = inputs[LENGTH, :hi]
                mask = (torch.arange(decode_len, device=self.device)[None, :] < lengths[:, None])[:, None, None]
            attention = SlotAttention(self.cache, inputs[SLOT, :n], inputs[POSITION, :n], len(layout.decode), hi,
                                      hi == len(layout.decode), decode_len, mask, layout.chunks, rows)
            self.cache.reach(layout.reach)
            context: AbstractContextManager[None] = contextlib.nullcontext()
            eager = forward is None
            if eager:  # a task's update by forward hooks
                forward = self.lean
                context = mixed.attached() if mixed is not None else context
            packed: AbstractContextManager[None] = contextlib.nullcontext()
            if eager and self.packed is not None and not plan.chunks:  # see engine.packed
                merged = None if mixed is not None or self._spec is None else (self._spec, self.tasks.registrations)
                packed = self.packed.attached(merged, n)
            with context, packed:
                logits = forward(input_ids=inputs[IDS, :n][None], position_ids=inputs[POSITION, :n][None],
                                 attention_mask=self._no_mask, use_cache=False,
                                 logits_to_keep=inputs[KEEP, :layout.kept], lora_step=attention).logits[0].float()
        if not layout.kept:
            return {}
        # A row is finite when its largest logit is (amax propagates NaN, +inf is the largest, and a row of -inf
        # has nothing to sample): one reduction, where comparing every logit cost 3% of a decode step.
        top = logits.amax(-1)
        finite = (top > -math.inf) & (top < math.inf)
        # The sampler never sees inf or NaN. A row mask costs masked_fill_ about 1 ns a logit on a CPU (0.1 ms a row of
        # SmolLM2's vocabulary), so there, where reading a flag syncs nothing, it runs only when a row needs it.
        if self.device.type != "cpu" or not bool(finite.all()):
            logits.masked_fill_(~finite[:, None], 0.0)
        rows = logits[:len(sampled)]
        failed = set(apply_masks(rows, [r.matcher for r in sampled]))  # constrained rows only; free rows untouched
        asked = [i for i, r in enumerate(sampled) if r.sampling.logprobs is not None]
        scored = rows[asked] if asked else rows[:0]  # a copy, after the mask: the sampler bans eos in place
        batch = self._params.batch([r.sampling for r in sampled],
                                   [len(r.tokens) < r.sampling.min_tokens for r in sampled],
                                   [r.generator for r in sampled], self.eos, logits.shape[-1])
        flat = torch.cat([sampler.sample(rows, batch), finite.long()]).tolist()  # the step's one sync
        tokens, ok = flat[:len(sampled)], flat[len(sampled):]
        results: dict[Request, Sampled] = {r: Sampled(t) for r, t in zip(sampled, tokens)}
        if asked:  # a further transfer only in steps where someone asked for logprobs
            tops = [sampled[i].sampling.logprobs or 0 for i in asked]
            entries = token_logprobs(scored, [tokens[i] for i in asked], tops)
            for i, entry in zip(asked, entries):
                results[sampled[i]].logprobs = entry
        self._prompt_logprobs(layout, logits[len(sampled):], results)
        out: StepResult = dict(results)
        for i, r in enumerate(sampled):
            if i in failed:
                out[r] = LoraError(f"the request's grammar failed ({r.matcher.error if r.matcher else ''}); "
                                   "simplify its schema, regex or grammar")
        at = len(sampled)
        for e in layout.echo:
            if not all(ok[at:at + e.end - e.start]):
                out[e.request] = non_finite(e.request, self.tasks.dtype)
            at += e.end - e.start
        for r, good in zip(sampled, ok):
            if not good:
                out[r] = non_finite(r, self.tasks.dtype)
        return out

    @staticmethod
    def _prompt_logprobs(layout: Layout, logits: torch.Tensor, results: dict[Request, Sampled]) -> None:
        """Each echoed chunk's prompt logprobs, from its rows of `logits` (kept after the sampled rows)."""
        if not layout.echo:
            return
        targets = [int(t) for e in layout.echo for t in e.request.prompt[e.start + 1:e.end + 1]]
        tops = [e.request.sampling.prompt_logprobs or 0 for e in layout.echo for _ in range(e.end - e.start)]
        entries = token_logprobs(logits, targets, tops) if targets else []
        at = 0
        for e in layout.echo:
            result = results.setdefault(e.request, Sampled())
            if e.start == 0:  # nothing predicts the first prompt token
                result.prompt_logprobs.append(TokenLogprobs(int(e.request.prompt[0]), None))
            result.prompt_logprobs.extend(entries[at:at + e.end - e.start])
            at += e.end - e.start

    def _compiled(self, plan: StepPlan, mixed: MixedTasks | None, n: int) -> Any:
        """The compiled forward for this step, or None (eager). Compiled code ignores forward hooks added after it
        was traced (dynamo does not guard on them), so it runs decode steps on plain or merged weights, and those
        with tasks' per-token updates on the graph that holds them (each row's slot written to the LORA row);
        never a step under an applied task's hooks (a quantized base's blend: its task is hooks too)."""
        compiled = self.compiled
        if compiled is None or plan.chunks or not compiled.ready.is_set():
            return None
        if mixed is None:
            return compiled if self.tasks.merges or self._spec is None else None
        if not mixed.tasks:
            return compiled
        forward = compiled.with_update(mixed.table, self._device[LORA, :n])
        if forward is not None:
            self._rows[LORA, :n] = mixed.token_slots.reshape(-1).numpy()
        return forward

    def _unhook(self) -> None:
        """No applied task's forward hooks on the model (a quantized base's): what a compile's trace must see."""
        if not self.tasks.merges:
            self.tasks.activate(None)

    def forget_tasks(self) -> None:
        """Drop the mixed updates built for the current tasks (one may have been registered again)."""
        self._mixed = None

    def _policy(self, requests: list[Request], counts: list[int]) -> MixedTasks | None:
        """Merged weights when the step has one task (after `merge_after` such steps), else per-token updates.

        Returns the mixed updates to attach for the forward (their task index filled in), or None.
        """
        specs = {r.spec for r in requests}
        uniform = len(specs) == 1
        self._merged_steps = self._merged_steps + 1 if uniform and specs == {self._spec} else int(uniform)
        self._spec = next(iter(specs)) if uniform else None
        must_merge = uniform and not self.tasks.can_mix(self._spec)
        if self.mode == "merged" or must_merge or (self.mode == "auto" and self.tasks.merges and uniform and (
                self._mixed is None or self._merged_steps >= self.merge_after)):
            self._mixed = None
            self.tasks.activate(self._spec)
            return None
        names = sorted({name for s in specs if s for name, _ in s})
        if self._mixed is None or not set(names) <= set(self._mixed.tasks) or \
                len(self._mixed.tasks) > 2 * len(names) + 2:
            self._mixed = self.tasks.mix(names, max_loras=self.max_loras)
        self.tasks.activate(None)
        index = {name: i + 1 for i, name in enumerate(self._mixed.tasks)}
        start = 0
        for r, count in zip(requests, counts):
            self._rows[TASK, start:start + count] = index[r.spec[0][0]] if r.spec else 0
            start += count
        return self._mixed

