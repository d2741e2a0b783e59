"""A lean forward of a Llama-family model for the engine's eager steps: the same values, without the per-layer plumbing.

Hugging Face's forward spends much of a small model's decode step outside its matmuls: per layer, keyword
plumbing through decorated calls (deprecated-argument checks, output capture, gradient-checkpointing layers),
the attention interface lookup, a six-op RMSNorm twice. This forward runs the same computation in the same
order on the same modules: every float linear layer and the embedding are still called as modules, so hooks
(a task's per-token update, a quantized base's task), prepacked or split weights (engine.packed) and merged
weights (lora.switch points parameters at them) all apply as before. Only the glue is rewritten: RMSNorm as
`F.rms_norm` in float32 (the same ops in the same order on a CPU, so bit for bit the same values; other dtypes
keep the module's own), rotary embeddings applied to queries and keys in one go, the residual adds, and the
engine's attention called directly. Every logit of an engine step comes out bit for bit as the model's own
forward gives it (SmolLM2, float32 and bfloat16, one and three sequences, prompt chunks included).
Measured together with the single stream's attention (engine.attention), SmolLM2-135M float32, AMD EPYC, 2
cores, torch 2.13: `bench/prepack.py --threads 2 --batch 1` (near idle) 46.4-46.8 -> 40.5-41.4 ms a decode step;
1 thread, CPU time, loaded: one sequence 64.0 -> 55.9 ms, 8 sequences 80.4 -> 76.7 ms; the forward's glue
alone (SmolLM2's layers with tiny matrices) 14.3 -> 8.8 ms a step.

Over a w8a16 or w4a16 base (lora.int8.Int8Linear, lora.int4.Int4Linear) the quantized layers are the exception:
where a layer has no hooks and no replaced forward it runs straight on its kernel, and a layer's q/k/v, and its
gate/up, as one matmul each over their rows concatenated (lora.int8.fuse_int8, lora.int4.fuse_int4: the same values;
211 -> 121 kernel calls a SmolLM2 token).
A layer with plain forward hooks (a task's update) still runs in its group's one call, then its hooks on its rows
(KernelGroup.outputs); other hooks or a replaced forward make it a module call. With modules read once (Layer),
1 thread, CPU time, loaded, interleaved with the previous commit: a w8a16 decode step 43.5 -> 36.9 ms.

It serves one kind of model: LlamaForCausalLM (SmolLM2 is one) with its own module classes, SiLU and the
engine's attention. Any other model, or a call where a module it would bypass has hooks or a replaced forward
(or global module hooks are set), runs the model's own forward: `LeanForward.__call__` checks at every call.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama as llama

from ..int4 import GROUP, fuse_int4
from ..int8 import fuse_int8
from .attention import ATTENTION, SlotAttention


class Logits(NamedTuple):
    """What the runner reads of a forward's output."""
    logits: torch.Tensor


class KernelGroup(NamedTuple):
    """Int8Linears or Int4Linears that read one input (a layer's q/k/v, its gate/up, or one layer alone) run as one
    call of their kernel (lora.int8.fuse_int8, lora.int4.fuse_int4), valid while each is as it was grouped
    (`intact`)."""
    weight: torch.Tensor
    scale: torch.Tensor  # int8: a scale per row; int4: (in / 32, rows, 2) scales and zeros
    members: tuple[tuple[Any, int, torch.Tensor], ...]  # each module, its weight's data_ptr, its scale tensor
    scale_name: str  # "scale" (int8) or "scales_and_zeros" (int4)

    def intact(self) -> bool:
        """No module has pre-hooks, hooks taking keyword arguments or a replaced forward, and each still holds the
        weight and scale it was grouped with; plain forward hooks (a task's update) are run by `outputs`.
        (Read from _parameters and _buffers: nn.Module's getattr would cost as much as a small layer's matmul.)"""
        return all(not m._forward_pre_hooks and not m._forward_hooks_with_kwargs and "forward" not in m.__dict__ and
                   m._parameters["weight"].data_ptr() == weight and m._buffers[self.scale_name] is scale
                   for m, weight, scale in self.members)

    def hooked(self) -> bool:
        """Whether a module has forward hooks (then `outputs` runs them; else the outputs are slices of one call)."""
        return any(m._forward_hooks for m, _, _ in self.members)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each module's output as calling it gives it: its rows of one kernel call in x's dtype, then its forward
        hooks in order, each given (module, (x,), output) and its result kept where not None, as nn.Module does."""
        out, start, outputs = self(x).to(x.dtype), 0, []
        for m, _, _ in self.members:
            rows = out[..., start:start + m.out_features].contiguous()  # a module's own output is contiguous
            start += m.out_features
            for hook in m._forward_hooks.values():
                result = hook(m, (x,), rows)
                rows = rows if result is None else result
            outputs.append(rows)
        return outputs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The modules' outputs side by side in bfloat16: what each layer computes before casting to x's dtype."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.scale_name == "scale":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.weight, GROUP, self.scale)
        return out.view(*x.shape[:-1], self.weight.shape[0])


def kernel_group(*modules: Any) -> KernelGroup | None:
    """The modules as one KernelGroup, or None where neither lora.int8.fuse_int8 nor lora.int4.fuse_int4 can make
    them one."""
    int8 = fuse_int8(list(modules))
    if int8 is not None:
        return KernelGroup(int8.weight, int8.scale, tuple((m, m.weight.data_ptr(), m.scale) for m in modules), "scale")
    int4 = fuse_int4(list(modules))
    if int4 is not None:
        return KernelGroup(int4.weight, int4.scales_and_zeros,
                           tuple((m, m.weight.data_ptr(), m.scales_and_zeros) for m in modules), "scales_and_zeros")
    return None


class Layer(NamedTuple):
    """A decoder layer's modules, read once: nn.Module's getattr costs about 1 us, and a step of SmolLM2 made 600."""
    input_norm: Any
    post_norm: Any
    attn: Any
    q: Any
    k: Any
    v: Any
    o: Any
    gate: Any
    up: Any
    down: Any
    qkv_packed: KernelGroup | None  # q, k, v as one int8 or int4 matmul (None: not all Int8Linear or Int4Linear)
    o_packed: KernelGroup | None
    gate_up_packed: KernelGroup | None
    down_packed: KernelGroup | None


def _layer(layer: Any) -> Layer:
    attn, mlp = layer.self_attn, layer.mlp
    q, k, v, o, gate, up, down = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, \
        mlp.down_proj
    return Layer(layer.input_layernorm, layer.post_attention_layernorm, attn, q, k, v, o, gate, up, down,
                 kernel_group(q, k, v), kernel_group(o), kernel_group(gate, up), kernel_group(down))


def _run(group: KernelGroup | None, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), straight on its kernel where its group is intact (no module call, no reshapes)."""
    if group is None or not group.intact():
        return module(x)
    return group.outputs(x)[0] if group.hooked() else group(x).to(x.dtype)


def _rms_norm(norm: llama.LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x), fused in float32 (the same ops in the same order); in bfloat16 or float16 F.rms_norm rounds once
    where the module rounds twice, so there the module runs."""
    if x.dtype != torch.float32:
        return norm(x)
    weight: Any = norm._parameters["weight"]
    return F.rms_norm(x, weight.shape, weight, norm.variance_epsilon)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or
                torch_module._global_forward_hooks_always_called or torch_module._global_backward_hooks or
                torch_module._global_backward_pre_hooks)


class LeanForward:
    """`model(**step)` for the engine's steps, computed without Hugging Face's plumbing where the model allows."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.steps = 0  # calls computed lean (engine stats' lean_steps_total: a fallback shows as steps not counted)
        self._read()

    def _read(self) -> None:
        """Read the model's modules, and the children of each that holds some (to see a module replaced)."""
        model = self.model
        self._bypassed = lean_modules(model)  # None: not a model this forward knows
        layers: list[Any] = list(model.model.layers) if self._bypassed is not None else []
        self._layers = [_layer(layer) for layer in layers]
        self._head = kernel_group(model.lm_head) if layers else None
        self._children = [(m, dict(m._modules)) for m in model.modules() if m._modules]

    def usable(self) -> bool:
        """Whether this call can run lean: a known model, nothing hooked or replaced on the modules it bypasses."""
        if any(m._modules != children for m, children in self._children):
            self._read()  # a module was replaced (LoRA layers injected, say)
        return self._bypassed is not None and not self.model.training and not _global_hooks() and \
            getattr(self.model.config, "_attn_implementation", None) == ATTENTION and not any(
                m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in self._bypassed)

    def __call__(self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor,
                 lora_step: SlotAttention, **kwargs: Any) -> Any:
        """The model's output for one engine step (`.logits` of the kept rows), as `model(...)` gives it."""
        if not self.usable():
            return self.model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep,
                              lora_step=lora_step, **kwargs)
        self.steps += 1
        return Logits(self._forward(input_ids, position_ids, logits_to_keep, lora_step))

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor,
                 step: SlotAttention) -> torch.Tensor:
        model = self.model.model
        hidden = model.embed_tokens(input_ids)
        rows = hidden.shape[1]
        cos, sin = model.rotary_emb(hidden, position_ids)  # (1, rows, head_dim) each, once for every layer
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin is cat(-x2, x1) * sin == roll(x, half) * cat(-sin1, sin2): a sign flip is exact
        cos, sin = cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]
        for layer in self._layers:
            attn = layer.attn
            x = _rms_norm(layer.input_norm, hidden)
            if layer.qkv_packed is not None and layer.qkv_packed.intact() and layer.qkv_packed.hooked():
                q, k, v = layer.qkv_packed.outputs(x)  # one kernel call, then a task's update on each
                qk = torch.cat((q, k), -1)
            elif layer.qkv_packed is not None and layer.qkv_packed.intact():  # q, k, v side by side: no cat
                out = layer.qkv_packed(x).to(x.dtype)  # what each layer casts its output to
                split = layer.q.out_features + layer.k.out_features
                qk, v = out[..., :split], out[..., split:]
            else:
                qk, v = torch.cat((layer.q(x), layer.k(x)), -1), layer.v(x)
            heads = layer.q.out_features // attn.head_dim
            # queries and keys rotated in one go, as apply_rotary_pos_emb does each: x * cos + rotate_half(x) * sin
            qk = qk.view(1, rows, -1, attn.head_dim)
            qk = (qk * cos).add_(qk.roll(half, -1).mul_(sin)).transpose(1, 2)
            v = v.view(1, rows, -1, attn.head_dim).transpose(1, 2)
            out, _ = step.attend(attn.layer_idx, qk[:, :heads], qk[:, heads:], v, attn.scaling)
            hidden = hidden + _run(layer.o_packed, layer.o, out.reshape(1, rows, -1))
            x = _rms_norm(layer.post_norm, hidden)
            if layer.gate_up_packed is not None and layer.gate_up_packed.intact() and layer.gate_up_packed.hooked():
                gate, up = layer.gate_up_packed.outputs(x)
            elif layer.gate_up_packed is not None and layer.gate_up_packed.intact():
                out = layer.gate_up_packed(x).to(x.dtype)
                width = layer.gate.out_features
                # silu of a contiguous copy: on a strided slice its vector and scalar paths split rows differently
                gate, up = out[..., :width].contiguous(), out[..., width:]
            else:
                gate, up = layer.gate(x), layer.up(x)
            hidden = hidden + _run(layer.down_packed, layer.down, F.silu(gate) * up)
        hidden = _rms_norm(model.norm, hidden)[:, keep]
        return _run(self._head, self.model.lm_head, hidden)


def lean_modules(model: Any) -> list[torch.nn.Module] | None:
    """The modules the lean forward runs in its own code instead of calling them, or None where the model is not
    one it computes exactly as the model's forward would."""
    if type(model) is not llama.LlamaForCausalLM:
        return None
    config, inner = model.config, model.model
    if type(inner) is not llama.LlamaModel or len(inner.layers) != config.num_hidden_layers or \
            type(inner.norm) is not llama.LlamaRMSNorm or type(inner.rotary_emb) is not llama.LlamaRotaryEmbedding:
        return None
    bypassed: list[torch.nn.Module] = [model, inner, inner.norm, inner.layers]
    layers: list[Any] = list(inner.layers)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        kinds: list[tuple[Any, type]] = [
            (layer, llama.LlamaDecoderLayer), (attn, llama.LlamaAttention), (mlp, llama.LlamaMLP),
            (layer.input_layernorm, llama.LlamaRMSNorm), (layer.post_attention_layernorm, llama.LlamaRMSNorm),
            (mlp.act_fn, SiLUActivation)]
        if any(type(m) is not kind for m, kind in kinds):
            return None
        bypassed += [m for m, _ in kinds]
    return bypassed
