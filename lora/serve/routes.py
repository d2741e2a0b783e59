"""The HTTP endpoints: each hands its request to `app.state.serving` (see serving.py)."""
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .protocol import ChatRequest, CompletionRequest, GenerateRequest, LoadAdapterRequest, UnloadAdapterRequest

router = APIRouter()


def serving(request):
    return request.app.state.serving


@router.get("/health")
async def health(request: Request):
    if request.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request):
    return serving(request).list_models()


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    return serving(request).get_model(model)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """A raw prompt (or a list of them) continued with the task's adapter applied."""
    return await serving(request).completions(body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    return await serving(request).chat_completions(body, request)


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request):
    """The native API: {downstream, instruction, input} in, generate_response's answer out."""
    return await serving(request).generate(body, request)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, request: Request):
    return await serving(request).load_adapter(body)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request):
    return await serving(request).unload_adapter(body)
