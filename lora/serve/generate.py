"""/v1/generate, the native API: {downstream, instruction, input} in, generate_response's answer out."""
import time
from typing import Any

from fastapi import Request

from .protocol import GenerateRequest
from .serving import Serving

DEFAULT_MAX_TOKENS = 256  # generate_response's


async def generate(serving: Serving, body: GenerateRequest, request: Request) -> dict[str, Any]:
    arrived = time.monotonic()
    task = None if body.downstream is None else serving.models.task_of(body.downstream, param="downstream")
    serving.limits.precheck(body, body.max_new_tokens, "max_new_tokens")
    chars = len(body.instruction) + len(body.input)
    serving.limits.check_text_length(chars, "instruction")
    (ids,) = await serving.prompts(task, [{"instruction": body.instruction, "input": body.input}], chars=chars)
    body.instruction = body.input = ""  # a waiting request holds its token ids, not its text
    grammar = await serving.grammar(task, body)
    job = serving.submit(task, [ids], body, arrived, max_tokens=body.max_new_tokens,
                         default_max_tokens=DEFAULT_MAX_TOKENS, param="max_new_tokens", extra={"grammar": grammar})
    del ids
    (out,) = await job.wait(request)
    return {"downstream": body.downstream, "response": out.text.strip(), "finish_reason": out.finish_reason,
            "usage": job.usage([out])}
