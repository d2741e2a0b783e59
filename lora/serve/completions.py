"""/v1/completions: raw prompts (one or a list) continued with the task's adapter applied."""
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .protocol import APIError, CompletionRequest
from .serving import Serving

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def create_completion(serving: Serving, body: CompletionRequest,
                            request: Request) -> dict[str, Any] | StreamingResponse:
    arrived = time.monotonic()  # latency metrics count the time spent tokenizing too
    limits = serving.limits
    task = serving.models.task_of(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt")
    limits.check_count(len(prompts), body.n)
    limits.precheck(body, body.max_tokens, "max_tokens")
    for prompt in prompts:
        limits.check_text_length(len(prompt), "prompt")
    ids = await serving.prompts(task, [{"prompt": p} for p in prompts], chars=sum(map(len, prompts)))
    del prompts
    body.prompt = ""  # a waiting request holds its token ids, not its text
    job = serving.submit(task, ids, body, arrived, n=body.n, max_tokens=body.max_tokens,
                         default_max_tokens=DEFAULT_MAX_TOKENS)
    del ids
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            async for index, out in job.outputs():
                if out.delta or out.finished:
                    yield {**head, "choices": [choice(index, out.delta, out.finish_reason)]}
        return serving.sse(job, head, chunks(), bool(body.stream_options and body.stream_options.include_usage))
    outs = await job.wait(request)
    return {**head, "choices": [choice(i, out.text, out.finish_reason) for i, out in enumerate(outs)],
            "usage": job.usage(outs)}
