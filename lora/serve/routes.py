"""The HTTP endpoints: each reads its body, then hands it to models.py or to an endpoint module."""
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .chat import create_chat_completion
from .completions import create_completion
from .generate import generate as create_generation
from .protocol import (
    Body,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    parse,
)
from .serving import Serving

router = APIRouter()
B = TypeVar("B", bound=Body)


def serving(request: Request) -> Serving:
    return request.app.state.serving


async def read(request: Request, model: type[B]) -> B:
    """The body as `model`. The gate (app.py) has read it whole and hands it over in one message; it is not
    kept on the Request, so once tokenized, a waiting request holds only its token ids."""
    message = await request.receive()
    return parse(message.get("body", b""), model)


@router.get("/health", response_model=None)
async def health(request: Request) -> Any:
    if request.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if serving(request).engine.dead is not None:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> dict[str, Any]:
    return serving(request).models.list()


@router.get("/v1/models/{model:path}", response_model=None)
async def get_model(model: str, request: Request) -> dict[str, Any]:
    return serving(request).models.get(model)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
    return await create_completion(serving(request), await read(request, CompletionRequest), request)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
    return await create_chat_completion(serving(request), await read(request, ChatRequest), request)


@router.post("/v1/generate", response_model=None)
async def generate(request: Request) -> dict[str, Any]:
    return await create_generation(serving(request), await read(request, GenerateRequest), request)


@router.post("/v1/load_lora_adapter", response_model=None)
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    s = serving(request)
    return await s.models.load(await read(request, LoadAdapterRequest), s.off_loop)


@router.post("/v1/unload_lora_adapter", response_model=None)
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    return await serving(request).models.unload(await read(request, UnloadAdapterRequest))
