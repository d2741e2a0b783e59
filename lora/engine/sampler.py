"""The batched sampler: one step's next tokens from their logits, every row with its own settings, one draw.

It cannot produce NaN or Inf and never raises on values: logits are float32 (a grammar's mask leaves each
row at least one finite token), temperatures under 1e-5 are greedy (vLLM's epsilon), top-k is clamped to
the vocabulary, top-p always keeps the most likely token, and a token is drawn as argmax(p / q) with
q ~ Exp(1) (the Gumbel-max trick vLLM uses), which needs no normalised distribution. A request with a seed
draws its q from its own generator, so its answer is the same alone or batched with any neighbours.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .request import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing by them would overflow float32
TOP_P_OFF = 2.0  # a top_p no cumulative probability reaches
HOTTEST = 1e4  # higher temperatures are this one (already uniform); in float32 they could reach inf


def seed_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator for a request's seed: each integer its own stream (the CPU generator keeps only 32 bits
    of its seed, so the seed is hashed, whole, first: 1 and 2**32 + 1 differ)."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


@dataclass
class SamplingBatch:
    """Per-row settings of one step's sampled rows, as tensors on the logits' device."""
    temperature: torch.Tensor  # (rows,) float32; 0: greedy
    top_p: torch.Tensor  # (rows,) float32; TOP_P_OFF: off
    top_k: torch.Tensor  # (rows,) int64; 0: off, else at most the vocabulary
    ban_eos: torch.Tensor  # (rows,) bool: min_tokens not reached, eos may not be drawn
    eos: torch.Tensor  # the ids that end an answer
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_ban: bool
    any_top_k: bool
    any_top_p: bool


class ParamBuffer:
    """Persistent buffers (pinned on a GPU) for the per-row settings: one copy to the device per step."""

    def __init__(self, rows: int, device: torch.device) -> None:
        on_gpu = device.type != "cpu"
        self.host = torch.zeros(4, rows, dtype=torch.float32, pin_memory=on_gpu)
        self.device = torch.empty_like(self.host, device=device) if on_gpu else self.host
        self.rows = self.host.numpy()

    def batch(self, params: list[SamplingParams], ban_eos: list[bool], generators: list[torch.Generator | None],
              eos: torch.Tensor, vocab: int) -> SamplingBatch:
        n, rows = len(params), self.rows
        for i, (p, ban) in enumerate(zip(params, ban_eos)):
            rows[:, i] = (0.0 if p.temperature < GREEDY_BELOW else min(p.temperature, HOTTEST),
                          TOP_P_OFF if p.top_p >= 1 else p.top_p, min(p.top_k, vocab), float(ban))
        if self.device is not self.host:
            self.device[:, :n].copy_(self.host[:, :n], non_blocking=True)
        table = self.device[:, :n]
        return SamplingBatch(table[0], table[1], table[2].long(), table[3] > 0, eos, generators,
                             not bool(rows[0, :n].any()), any(ban_eos), bool(rows[2, :n].any()),
                             bool((rows[1, :n] < 1).any()))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The next token of every row of logits (rows, vocab): greedy rows take the argmax, others a draw."""
    logits = logits.float()
    if batch.any_ban:
        eos = logits[:, batch.eos]
        logits[:, batch.eos] = eos.masked_fill(batch.ban_eos[:, None], -math.inf)
        # a grammar that allows nothing but eos here ends the answer, min_tokens or not: such a row keeps its eos
        empty = ~(logits > -math.inf).any(-1, keepdim=True)
        logits[:, batch.eos] = torch.where(empty, eos, logits[:, batch.eos])
    greedy = logits.argmax(-1)
    if batch.all_greedy:
        return greedy
    hot = batch.temperature > 0
    logits = logits / torch.where(hot, batch.temperature, 1.0)[:, None]
    if batch.any_top_k or batch.any_top_p:
        logits = _top_k_top_p(logits, batch)
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    drawn = (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(-1)
    return torch.where(hot, drawn, greedy)


def _top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask everything outside each row's top k and top p (the most likely token always stays)."""
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if batch.any_top_k:
        rank = torch.arange(ordered.shape[-1], device=logits.device)
        k = batch.top_k[:, None]
        drop |= (k > 0) & (rank[None, :] >= k)
    if batch.any_top_p:
        probs = ordered.masked_fill(drop, -math.inf).softmax(-1)
        drop |= probs.cumsum(-1) - probs >= batch.top_p[:, None]  # keep the smallest set reaching top_p
    drop[:, 0] = False
    return logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
