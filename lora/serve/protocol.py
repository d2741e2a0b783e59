"""The wire format: request bodies as pydantic models, and errors in OpenAI's JSON shape."""
from typing import Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

INT64 = (-(1 << 63), (1 << 63) - 1)
UNION_TAGS = {"str", "int", "float", "bool", "none"}


class APIError(Exception):
    """An error as OpenAI answers it: {"error": {"message", "type", "param", "code"}} with its HTTP status."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc):
    """Pydantic's errors as one OpenAI error: 400 for a body that is not JSON, 422 for wrong fields."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    # loc is ("body", field, index, field, ...), with union member tags ("str", "list[str]") mixed in
    fields = [str(p) for p in first["loc"][1:] if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p
                                                                                or p[:1].isupper()))]
    param = ".".join(fields) or None
    return APIError(422, f"{param or 'request body'}: {first['msg']}", param=param, code=first["type"])


class Body(BaseModel):
    # Strict: "5" is not a number. Fields the API defines but this server does not act on (user, logit_bias...) pass.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The sampling fields of OpenAI's completion bodies, plus vLLM's extras that benchmark tools send."""
    temperature: Optional[float] = Field(None, ge=0, le=2)  # unset or 0: greedy
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's: -1 or 0 is off
    seed: Optional[int] = Field(None, ge=INT64[0], le=INT64[1])
    stop: Union[str, list[str], None] = Field(None, max_length=4)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    def stop_strings(self):
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s)


class OpenAISampling(Sampling):
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(OpenAISampling):
    model: str
    prompt: Union[str, list[str]]


class ContentPart(Body):
    type: str
    text: Optional[str] = None


class Message(Body):
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self):
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(OpenAISampling):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name for max_tokens


class GenerateRequest(Sampling):
    """The native endpoint: the arguments of MultiTaskModel.generate_response."""
    downstream: Optional[str] = None
    instruction: str = ""
    input: str = ""
    max_new_tokens: Optional[int] = Field(None, ge=1)


class LoadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)
