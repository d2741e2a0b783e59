"""How a Hugging Face model's tensors appear in GGUF: architecture, tensor names, llama.cpp's rotary row order.

llama.cpp's converter reorders the rows of Llama-family q_proj and k_proj weights: within each head, HF keeps
the two rotary halves apart (x0..x31, y0..y31) and GGUF interleaves them (x0, y0, x1, y1, ...). A LoRA delta
on those weights must have its rows (the rows of B) reordered the same way, or it lands on the wrong
coordinates. Everything else keeps PyTorch's (out, in) row layout.
"""
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from .errors import LoraError


@dataclass(frozen=True)
class Family:
    """One GGUF architecture: its name, the HF modules LoRA can target in it, and whether q/k rows are reordered."""
    arch: gguf.MODEL_ARCH
    block: str  # HF module prefix of block {bid}
    block_modules: tuple[str, ...]
    embedding: str
    head: str
    rope_reorder: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


LLAMA = Family(gguf.MODEL_ARCH.LLAMA, "model.layers.{bid}.",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.embed_tokens", "lm_head", True)
GPT2 = Family(gguf.MODEL_ARCH.GPT2, "transformer.h.{bid}.", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
              "transformer.wte", "lm_head", False)
# HF model_type -> family; llama.cpp's converter writes Mistral as "llama" too, with the same reordering.
FAMILIES = {"llama": LLAMA, "mistral": LLAMA, "gpt2": GPT2}
BY_GGUF_NAME = {f.name: f for f in FAMILIES.values()}


@dataclass(frozen=True)
class Layout:
    """A base model as GGUF sees it: family, block count, head counts (for the q/k reordering), tied head."""
    family: Family
    n_blocks: int
    n_head: int
    n_head_kv: int
    tied_head: bool

    def tensor_name(self, module: str) -> str:
        """GGUF tensor name of an HF module's weight: model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight."""
        name = gguf.get_tensor_name_map(self.family.arch, self.n_blocks).get_name(module)
        if name is None:
            raise LoraError(f"module {module} has no tensor in llama.cpp's {self.family.name} models; export an "
                            "adapter on the attention and MLP projections only")
        return name + ".weight"

    def module_names(self) -> dict[str, str]:
        """{GGUF tensor name: HF module name} for every module LoRA can target in this family."""
        f = self.family
        names = [f.block.format(bid=b) + m for b in range(self.n_blocks) for m in f.block_modules]
        return {self.tensor_name(n): n for n in [*names, f.embedding, f.head]}

    def rope_heads(self, module: str) -> int | None:
        """How many heads the rows of `module` are reordered in (q: query heads, k: key/value heads), or None."""
        if not self.family.rope_reorder:
            return None
        if module.endswith("self_attn.q_proj"):
            return self.n_head
        if module.endswith("self_attn.k_proj"):
            return self.n_head_kv
        return None


def layout_of(config: Any) -> Layout:
    """The GGUF layout of a transformers config; a LoraError for architectures this exporter does not map."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise LoraError(f"exporting to GGUF supports Llama-family (llama, mistral) and GPT-2 models, not "
                        f"{model_type!r}; use --format merged and convert that folder with llama.cpp's "
                        "convert_hf_to_gguf.py")
    n_head = int(config.num_attention_heads)  # transformers maps GPT-2's n_head to this name
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    return Layout(family, int(config.num_hidden_layers), n_head, n_head_kv,
                  bool(getattr(config, "tie_word_embeddings", False)))


def rope_reorder(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary row order -> GGUF's, along dim 0: per head, the two halves interleaved."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rope_restore(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF's rotary row order -> HF's: the inverse of rope_reorder."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
