"""/v1/chat/completions: a conversation rendered as the task was trained, answered by its adapter."""
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import Output
from ..logprobs import chat_logprobs
from .limits import TURN_CHARS
from .protocol import APIError, ChatRequest
from .serving import Serving


class TrimmedDeltas:
    """Chat and /v1/generate answers are trimmed as generate_response trims them; streamed, whitespace
    that may turn out to be trailing is held back, so the deltas add up to the trimmed answer."""

    def __init__(self) -> None:
        self.sent: dict[int, str] = {}

    def delta(self, index: int, out: Output) -> str:
        text = out.text.strip()
        sent = self.sent.get(index, "")
        if len(text) <= len(sent) or not text.startswith(sent):
            return ""
        self.sent[index] = text
        return text[len(sent):]


async def create_chat_completion(serving: Serving, body: ChatRequest,
                                 request: Request) -> dict[str, Any] | StreamingResponse:
    arrived = time.monotonic()  # latency metrics count the time spent tokenizing too
    limits = serving.limits
    task = serving.models.task_of(body.model)
    limits.check_count(1, body.n)
    limits.check_turns(len(body.messages))
    requested, param = (body.max_completion_tokens, "max_completion_tokens") \
        if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    extra: dict[str, Any] = {"logprobs": body.top_logprobs or 0} if body.logprobs else {}
    limits.precheck(body, requested, param, extra)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    body.messages = []  # a waiting request holds its token ids, not its text
    chars = sum(len(m["content"]) + TURN_CHARS for m in messages)
    limits.check_text_length(chars, "messages")
    (ids,) = await serving.prompts(task, [{"messages": messages}], chars=chars)
    del messages
    extra["grammar"] = await serving.grammar(task, body)
    job = serving.submit(task, [ids], body, arrived, n=body.n, max_tokens=requested, param=param, extra=extra)
    tokenizer = serving.mt.tokenizer
    del ids
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "object": "chat.completion.chunk" if body.stream else "chat.completion"}
    if body.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            strip = TrimmedDeltas()
            for index in range(body.n):
                yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}
            async for index, out in job.outputs():
                delta = strip.delta(index, out)
                logprobs = chat_logprobs(tokenizer, out.logprobs) if body.logprobs and out.logprobs else None
                if delta or out.finished or logprobs:
                    yield {**head, "choices": [{"index": index, "delta": {"content": delta} if delta else {},
                                                "logprobs": logprobs, "finish_reason": out.finish_reason}]}
        return serving.sse(job, head, chunks(), bool(body.stream_options and body.stream_options.include_usage))
    outs = await job.wait(request)
    shaped = await serving.off_loop(lambda: [chat_logprobs(tokenizer, job.logprobs.get(i, [])) if body.logprobs
                                             else None for i in range(len(outs))])
    return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": out.text.strip()},
                                 "logprobs": shaped[i], "finish_reason": out.finish_reason}
                                for i, out in enumerate(outs)],
            "usage": job.usage(outs)}
