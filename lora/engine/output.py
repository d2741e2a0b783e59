"""From sampled tokens to Outputs: incremental detokenizing, eos / stop strings / length, and the deltas.

The answer is decoded a few tokens at a time (vLLM's prefix and read offsets: only the tokens since the
last complete character are decoded again), stop strings are looked for only where the new text could
complete one, and the text that could still become a stop string is held back from the deltas.
"""
from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .request import Output, Request


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos and the generation config's (chat models list several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


class OutputProcessor:
    """Appends tokens to requests and makes their Outputs; `emit` hands them to the callbacks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: list[int]) -> None:
        self.tokenizer, self.eos = tokenizer, set(eos)

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _new_text(self, request: Request, flush: bool = False) -> str:
        """Text the tokens since the last complete character add ("" while a character's bytes are incomplete)."""
        tokens = request.tokens
        prefix = self._decode(tokens[request.prefix_offset:request.read_offset])
        full = self._decode(tokens[request.prefix_offset:])
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            request.prefix_offset, request.read_offset = request.read_offset, len(tokens)
            return full[len(prefix):]
        return ""

    def append(self, request: Request, token: int) -> Output:
        """Add a sampled token; finish on eos, a stop string or max_tokens. Returns the request's new Output."""
        request.tokens.append(token)
        s = request.sampling
        if token in self.eos and not s.ignore_eos and len(request.tokens) > s.min_tokens:
            return self.finish(request, "stop", [token])
        if not (s.stop or request.on_output):  # nobody reads the text before the end: decode it once then
            if len(request.tokens) >= s.max_tokens:
                return self.finish(request, "length", [token])
            return self._output(request, "", [token])
        old = len(request.text)
        request.text += self._new_text(request)
        hold = max(map(len, s.stop), default=1) - 1  # text that may yet become a stop string
        search = max(0, old - hold)
        cut = min((at for at in (request.text.find(stop, search) for stop in s.stop) if at >= 0), default=None)
        if cut is not None:
            request.text = request.text[:cut]
            return self.finish(request, "stop", [token], flush=False)
        if len(request.tokens) >= s.max_tokens:
            return self.finish(request, "length", [token])
        visible = max(request.sent, len(request.text) - hold)
        delta = request.text[request.sent:visible]
        request.sent = visible
        return self._output(request, delta, [token])

    def finish(self, request: Request, reason: str, new_token_ids: list[int] | None = None,
               error: BaseException | None = None, flush: bool = True) -> Output:
        """The request's last Output: the whole text (up to a stop string), what was not sent yet as the delta."""
        if not (request.sampling.stop or request.on_output):
            request.text = self._decode(request.tokens)  # decoded only now (see append)
        elif flush:
            request.text += self._new_text(request, flush=True)
        delta = request.text[request.sent:]
        request.sent = len(request.text)
        return self._output(request, delta, new_token_ids or [], reason, error)

    def fail(self, request: Request, reason: str, error: BaseException | None) -> Output:
        """The request's last Output without decoding anything more (when decoding itself failed): never raises."""
        request.sent = min(request.sent, len(request.text))
        return self._output(request, "", [], reason, error)

    @staticmethod
    def _output(request: Request, delta: str, new_token_ids: list[int], reason: str | None = None,
                error: BaseException | None = None) -> Output:
        s, n = request.sampling, len(request.tokens)
        logprobs = request.logprobs[n - len(new_token_ids):n] if s.logprobs is not None else None
        first = request.output is None
        prompt_logprobs = request.prompt_logprobs if first and s.prompt_logprobs is not None else None
        request.output = Output(request.request_id, request.text[:request.sent], delta, new_token_ids, n,
                                len(request.prompt), reason is not None, reason, error, logprobs, prompt_logprobs)
        if reason is not None:
            request.done.set()
        return request.output
