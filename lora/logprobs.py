"""Log-probabilities as OpenAI's APIs report them: each sampled (or echoed prompt) token's and the top alternatives'.

They come from the float32 logits of the step that chose the token, after the grammar mask and before
temperature, top-k or top-p (what the model says, as vLLM reports by default):
  token_logprobs(logits, sampled, top)        the engine, per step, for the rows that asked for logprobs
  prompt_logprobs(logits, prompt_ids, top)    the engine, for echo: logits of every prompt position
  chat_logprobs / completion_logprobs         the server: OpenAI's JSON shapes for chat and completions
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .structured import guide

FLOOR = -9999.0  # JSON has no -inf; a token the mask forbids is reported as this (vLLM's choice too)


@dataclass
class TokenLogprobs:
    """One token's log-probability and the `top` most likely tokens at its position, most likely first.

    logprob is None for a prompt's first token, which nothing predicts (OpenAI's echo reports null there).
    """
    token_id: int
    logprob: float | None
    top: dict[int, float] = field(default_factory=dict)


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor,
                   top: int | Sequence[int] = 0) -> list[TokenLogprobs]:
    """Per row: log_softmax(logits)[token] and the top-k; one device sync for the whole batch.

    logits: [rows, vocab] (float32 after the mask); token_ids: one per row; top: one k for all rows or one per row.
    """
    tops = [top] * len(logits) if isinstance(top, int) else list(top)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(token_ids, device=logits.device).long()
    chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
    k = min(max(tops, default=0), logp.shape[-1])
    values, indices = (t.tolist() for t in logp.topk(k, dim=-1))
    return [TokenLogprobs(int(t), c, dict(zip(i[:n], v[:n])))
            for t, c, i, v, n in zip(ids.tolist(), chosen, indices, values, tops)]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int = 0) -> list[TokenLogprobs]:
    """Every prompt token's log-probability given the tokens before it (echo); the first has none.

    logits: [len(prompt_ids), vocab], row i being the model's scores after prompt_ids[:i + 1] (the last row,
    which predicts the first answer token, is not used). A chunked prefill may instead call token_logprobs per
    chunk with the next prompt token of each position.
    """
    if not prompt_ids:
        return []
    return [TokenLogprobs(int(prompt_ids[0]), None), *token_logprobs(logits[:-1], list(prompt_ids[1:]), top)]


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, FLOOR)


class _Tokens:
    """Token id -> its text and bytes, through the tokenizer's llguidance binding (exact bytes, cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self._guide = guide(tokenizer)

    def bytes(self, token_id: int) -> bytes:
        return self._guide.token_bytes(token_id)

    def text(self, token_id: int) -> str:
        # a token may hold part of a UTF-8 character; its `bytes` are exact, its text shows U+FFFD there
        return self.bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprobs]) -> dict:
    """Chat completions' choice.logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    tokens = _Tokens(tokenizer)

    def one(token_id: int, logprob: float | None) -> dict:
        return {"token": tokens.text(token_id), "logprob": _finite(logprob), "bytes": list(tokens.bytes(token_id))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top.items()]}
                        for e in entries]}


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprobs], text_offset: int = 0) -> dict:
    """Completions' choice.logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one per token.

    Each top_logprobs dict holds the top tokens and the chosen one (as OpenAI's legacy API and vLLM do);
    None where the logprob is None (an echoed prompt's first token). text_offset: where the first token's text
    starts in the choice's text (0 with echo; the prompt's length without).
    """
    tokens = _Tokens(tokenizer)
    texts = [tokens.text(e.token_id) for e in entries]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    tops: list[dict[str, float | None] | None] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        # keyed by text, as OpenAI's are: tokens of the same text (parts of one character all read U+FFFD) keep the
        # likeliest one's logprob, so the greedy token's logprob is the top one (lm-eval's is_greedy reads it so)
        listed: dict[str, float] = {}
        for t, lp in [*e.top.items(), (e.token_id, e.logprob)]:
            key = tokens.text(t)
            listed[key] = max(listed.get(key, -math.inf), lp)
        tops.append({key: _finite(lp) for key, lp in listed.items()})
    return {"tokens": texts, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": tops,
            "text_offset": offsets}
