"""/v1/completions: raw prompts (text or token ids, one or a list) continued with the task's adapter applied.

Also what lm-evaluation-harness's local-completions scores with: `logprobs` (the sampled tokens' and top
alternatives'), `echo` (the prompt before the completion, with its logprobs), `max_tokens: 0` with echo.
"""
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..logprobs import TokenLogprobs, completion_logprobs
from .protocol import APIError, CompletionRequest
from .serving import Serving

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def token_prompts(prompt: Any) -> list[list[int]] | None:
    """The prompts as token ids when they were sent so (a list of ints, or of such lists); None for text."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return prompt
    return None


def sampling_extra(body: CompletionRequest) -> dict[str, Any]:
    """The SamplingParams fields logprobs and echo ask for: an echo with logprobs (or of nothing but the
    prompt, max_tokens 0) needs the prompt's logprobs."""
    extra: dict[str, Any] = {}
    if body.logprobs is not None:
        extra["logprobs"] = body.logprobs
    if body.echo and (body.logprobs is not None or body.max_tokens == 0):
        extra["prompt_logprobs"] = body.logprobs or 0
    return extra


async def create_completion(serving: Serving, body: CompletionRequest,
                            request: Request) -> dict[str, Any] | StreamingResponse:
    arrived = time.monotonic()  # latency metrics count the time spent tokenizing too
    limits = serving.limits
    task = serving.models.task_of(body.model)
    if body.stream and body.echo:
        raise APIError(400, "echo is not supported with stream; send stream false to get the prompt back",
                       param="echo")
    given = token_prompts(body.prompt)
    texts: list[str] = [] if given is not None else [body.prompt] if isinstance(body.prompt, str) \
        else [str(p) for p in body.prompt]
    count = len(given) if given is not None else len(texts)
    if not count:
        raise APIError(400, "prompt is an empty list", param="prompt")
    limits.check_count(count, body.n)
    extra = sampling_extra(body)
    limits.precheck(body, body.max_tokens, "max_tokens", extra)
    for text in texts:
        limits.check_text_length(len(text), "prompt")
    if given is not None:
        ids = given
    else:
        ids = await serving.prompts(task, [{"prompt": p} for p in texts], chars=sum(map(len, texts)))
    extra["grammar"] = await serving.grammar(task, body)
    tokenizer = serving.mt.tokenizer
    if (body.echo or body.logprobs is not None) and given is not None:  # the prompts' text, to echo or to offset
        texts = await serving.off_loop(lambda: [str(tokenizer.decode(p)) for p in given])
    if not (body.echo or body.logprobs is not None):
        texts = []  # a waiting request holds its token ids, not its text
    body.prompt = ""
    job = serving.submit(task, ids, body, arrived, n=body.n, max_tokens=body.max_tokens,
                         default_max_tokens=DEFAULT_MAX_TOKENS, extra=extra)
    del ids
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            offsets = {i: len(texts[i // body.n]) for i in range(count * body.n)} if texts else {}
            async for index, out in job.outputs():
                logprobs = None
                if body.logprobs is not None and out.logprobs:
                    logprobs = completion_logprobs(tokenizer, out.logprobs, offsets[index])
                    offsets[index] += sum(map(len, logprobs["tokens"]))
                if out.delta or out.finished or logprobs:
                    yield {**head, "choices": [choice(index, out.delta, out.finish_reason, logprobs)]}
        return serving.sse(job, head, chunks(), bool(body.stream_options and body.stream_options.include_usage))
    outs = await job.wait(request)

    def shaped(i: int) -> dict[str, Any]:
        out, prompt = outs[i], texts[i // body.n] if texts else ""
        logprobs = None
        if body.logprobs is not None:
            entries: list[TokenLogprobs] = job.logprobs.get(i, [])
            if body.echo:
                entries = job.prompt_logprobs.get(i, []) + entries
            logprobs = completion_logprobs(tokenizer, entries, 0 if body.echo else len(prompt))
        return choice(i, prompt + out.text if body.echo else out.text, out.finish_reason, logprobs)
    choices = await serving.off_loop(lambda: [shaped(i) for i in range(len(outs))])
    return {**head, "choices": choices, "usage": job.usage(outs)}
