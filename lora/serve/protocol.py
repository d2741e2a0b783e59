"""The wire format: request bodies as pydantic models (JSON types only), and errors in OpenAI's JSON shape.

Value ranges are not checked here: sampling limits belong to `lora.engine.SamplingParams.check()` and the
server's own limits to limits.py. Fields OpenAI (or vLLM) defines that this server does not implement are
refused by name unless they hold their neutral value, so a client never gets silently different output.
"""
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT64 = (-(1 << 63), (1 << 63) - 1)
UNION_TAGS = {"str", "int", "float", "bool", "none"}
# Field -> the values that ask for nothing (then it is accepted and ignored); any other value gets a 400.
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "suffix": (None, ""), "prediction": (None,), "audio": (None,),
    "modalities": (None, ["text"]),
    # vLLM's sampling extras that change the output
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
    "use_beam_search": (None, False), "prompt_logprobs": (None,), "include_stop_str_in_output": (None, False),
    "bad_words": (None, []), "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,),
}
# the fields that constrain an answer (lora.structured.request_constraint reads them)
CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")


class APIError(Exception):
    """An error as OpenAI answers it: {"error": {"message", "type", "param", "code"}} with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: ValidationError) -> APIError:
    """Pydantic's errors as one OpenAI error: 400 for a body that is not JSON, 422 for wrong fields."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        reason = str(first.get("ctx", {}).get("error", first["msg"]))
        if "escape" in reason or "surrogate" in reason:  # "\ud800" alone: not text, and not UTF-8 encodable
            reason = f"a string holds a lone UTF-16 surrogate such as \\ud800 ({reason}); send valid Unicode"
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    # loc is (field, index, field, ...), with union member tags ("str", "list[str]") mixed in
    fields = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p
                                                                          or p[:1].isupper()))]
    param = ".".join(fields) or None
    return APIError(422, f"{param or 'request body'}: {first['msg']}", param=param, code=first["type"])


class Body(BaseModel):
    # Strict: "5" is not a number. Unknown fields are kept only to refuse the NOT_IMPLEMENTED ones by name.
    model_config = ConfigDict(extra="allow", strict=True)

    def check_implemented(self) -> None:
        for name, value in (self.model_extra or {}).items():
            neutral = NOT_IMPLEMENTED.get(name)
            if neutral is not None and not any(type(value) is type(n) and value == n for n in neutral):
                raise APIError(400, f"{name} is not implemented by this server; leave it out"
                               + (f" or send {neutral[1]!r}" if len(neutral) > 1 else ""),
                               param=name, code="unsupported_field")


B = TypeVar("B", bound=Body)


def parse(raw: bytes, model: type[B]) -> B:
    """A request body as `model`: valid JSON (no lone surrogates), the right types, nothing unimplemented asked."""
    try:
        body = model.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise validation_error(e) from None
    body.check_implemented()
    # Unknown fields (a client's "user", metadata) could be a megabyte: a waiting request keeps none of them.
    body.__pydantic_extra__ = {}
    return body


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The sampling fields of OpenAI's completion bodies, plus vLLM's extras that benchmark tools send."""
    temperature: float | None = None  # unset or 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # vLLM's: -1 or 0 is off
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])  # the JSON type: a 64-bit integer
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs (one at most)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def constraint_fields(self) -> dict[str, Any]:
        """The structured-output fields the request gives."""
        return {name: getattr(self, name) for name in CONSTRAINT_FIELDS if getattr(self, name) is not None}


class OpenAISampling(Sampling):
    max_tokens: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(OpenAISampling):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids, one prompt or several
    logprobs: int | None = None  # the sampled tokens' logprobs and this many alternatives
    echo: bool = False  # the prompt comes back before the completion (with its logprobs, if asked)


class ContentPart(Body):
    type: str
    text: str | None = None


class Message(Body):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(OpenAISampling):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token, with logprobs


class GenerateRequest(Sampling):
    """The native endpoint: the arguments of MultiTaskModel.generate_response."""
    downstream: str | None = None
    instruction: str = ""
    input: str = ""
    max_new_tokens: int | None = None


class LoadAdapterRequest(Body):
    lora_name: str
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(Body):
    lora_name: str
