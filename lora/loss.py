"""The training loss without the batch's full logits.

`model(**batch).loss` computes float32 logits for every position of every row: batch x length x vocab
(8 x 512 x 49k floats is 800 MB for SmolLM2, twice over with the gradient). Only positions with a
label are needed, so the model body runs for hidden states, the positions whose next token is a
target are picked out, and the output head plus cross-entropy run over them in chunks, each chunk
checkpointed so its logits are recomputed in backward instead of kept (the torchtune recipe).
"""
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

# A chunk's backward holds three float32 logit tensors at once (the saved log-softmax, its gradient, the gradient
# through it): 0.4-0.6 GB at 1024 positions x 32k-49k vocab, the peak of a whole training step of a 1B Llama at
# 4 x 512 (README); at 256 positions 0.1-0.15 GB, below a decoder layer's backward.
CHUNK_TOKENS = 256


def target_count(labels: torch.Tensor) -> int:
    """Positions that are trained on: labels shift left by one, as in model(**batch).loss."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@torch.no_grad()
def logits_are_head_of_hidden(model: Any) -> bool:  # a transformers PreTrainedModel
    """True when the model's logits are just its output head applied to its body's last hidden state.

    Models that scale or soft-cap logits after the head (Gemma 2, Cohere, Granite) fail this and keep
    the plain model(**batch) loss.
    """
    was_training = model.training
    model.eval()
    ids = torch.arange(1, 9, device=model.device).remainder(model.config.vocab_size)[None]
    logits = model(input_ids=ids, use_cache=False).logits.float()
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    model.train(was_training)
    return torch.allclose(model.get_output_embeddings()(hidden).float(), logits, rtol=1e-6, atol=1e-6)


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over a batch's labelled positions (divide by target_count for the mean).

    Equal to model(**batch).loss * target_count(batch["labels"]). Wrapping this module, not the model,
    in DistributedDataParallel keeps the loss inside DDP's forward.

    Args:
        model: a Hugging Face causal LM (with LoRA layers or not).
        chunked: pick target positions and chunk the head; False computes full logits (for models
            whose logits are not the head of the hidden state, see logits_are_head_of_hidden).
    """

    def __init__(self, model: Any, chunked: bool = True) -> None:  # model: a transformers PreTrainedModel
        super().__init__()
        self.model = model
        self.chunked = chunked

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = batch["labels"][:, 1:]
        if not self.chunked:
            logits = self.model(**inputs, use_cache=False).logits[:, :-1]
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        head = self.model.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, t in zip(hidden.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS)):
            total = total + checkpoint(head_loss, head, h, t, use_reentrant=False)
        return total
