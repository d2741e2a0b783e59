"""The server's request limits, in one place: prompts x n, text and turn counts, token budgets, sampling."""
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..engine import SamplingParams
from ..errors import LoraError
from .protocol import APIError, Sampling

TURN_CHARS = 16  # what a chat template writes around one message, at least: empty turns are not free


@dataclass
class Limits:
    """What one request may ask for.

    Args:
        max_tokens_cap: the most tokens one request may generate (--max-tokens-cap).
        max_prompts: the most prompts x n one request may hold (--max-prompts).
        context_length: prompt plus completion tokens (the engine's max_model_len).
        max_chat_turns: the most messages in one chat request (--max-chat-turns).
        max_token_chars: the longest token's length in characters (bounds what a text can tokenize to).
    """
    max_tokens_cap: int
    max_prompts: int
    context_length: int
    max_chat_turns: int = 256
    max_token_chars: int = 1

    def check_count(self, prompts: int, n: int) -> None:
        if n < 1:
            raise APIError(400, f"n is {n}; ask for at least 1 completion", param="n")
        if prompts * n > self.max_prompts:
            raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} completions, "
                           f"over this server's limit of {self.max_prompts} (--max-prompts); split it into "
                           "smaller requests", param="prompt" if n == 1 else "n", code="too_many_prompts")

    def check_turns(self, turns: int) -> None:
        if turns > self.max_chat_turns:
            raise APIError(400, f"the chat holds {turns} messages, over this server's limit of {self.max_chat_turns} "
                           "(--max-chat-turns); send fewer", param="messages", code="too_many_messages")

    def check_text_length(self, chars: int, param: str) -> None:
        """Refuse text too long for the context in any tokenization before tokenizing it: a megabyte takes
        seconds of CPU to tokenize. (2x margin for normalizers that drop characters.)"""
        if chars > 2 * self.context_length * self.max_token_chars:
            raise APIError(400, f"the prompt holds {chars:,} characters, more than this model's maximum context length "
                           f"of {self.context_length} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")

    def check_max_tokens(self, requested: int | None, param: str) -> None:
        if requested is not None and requested > self.max_tokens_cap:
            raise APIError(400, f"{param} is {requested}, over this server's cap of {self.max_tokens_cap}",
                           param=param, code="max_tokens_exceeded")

    def max_tokens_for(self, requested: int | None, prompt_tokens: int, default: int | None, param: str) -> int:
        """The completion's token budget: `requested`, else what fits, within the cap and the context."""
        room = self.context_length - prompt_tokens
        max_tokens = requested if requested is not None else min(default or self.max_tokens_cap, self.max_tokens_cap,
                                                                  max(room, 1))
        if prompt_tokens + max_tokens > self.context_length:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                           f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                           f"{max_tokens} for the completion). Please reduce the prompt or the completion length.",
                           param=param if requested is not None else "prompt", code="context_length_exceeded")
        return max_tokens

    def sampling(self, body: Sampling, max_tokens: int, param: str = "max_tokens",
                 extra: dict[str, Any] | None = None) -> SamplingParams:
        """The body's sampling fields as the engine's SamplingParams, checked by the engine's one validator;
        `extra`: the SamplingParams fields an endpoint sets itself (grammar, logprobs, prompt_logprobs)."""
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=0 if body.top_k is None else body.top_k,
            min_tokens=body.min_tokens, stop=body.stop or (), ignore_eos=body.ignore_eos, seed=body.seed,
            **(extra or {}))
        try:
            return params.check()
        except LoraError as e:
            message = str(e).replace("max_tokens", param) if param != "max_tokens" else str(e)
            raise APIError(400, message, code="invalid_sampling_params") from None

    def precheck(self, body: Sampling, requested: int | None, param: str, extra: dict[str, Any] | None = None) -> None:
        """Sampling checked before any tokenizing, with the budget the request may get at most."""
        self.check_max_tokens(requested, param)
        self.sampling(body, self.max_tokens_cap if requested is None else requested, param, extra)


def seeded(params: SamplingParams, sample: int) -> SamplingParams:
    """Sample j of n: a seeded request's n samples differ from each other, and each is reproducible."""
    return params if params.seed is None else dataclasses.replace(params, seed=params.seed + sample)
