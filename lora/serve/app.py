"""The ASGI app (create_app: state, middleware, error handlers, lifespan) and `run` with a bounded drain."""
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..models import model_name
from .gate import BODY_TIMEOUT, MAX_BODY_BYTES, GuardedH11Protocol, RequestGuard
from .limits import Limits
from .models import ServedModels
from .protocol import APIError
from .routes import router
from .serving import Serving

log = logging.getLogger("lora.serve")
SHUTDOWN_TIMEOUT = 30.0
ENGINE_STOP_TIMEOUT = 10.0


def create_app(mt: Any, engine: Engine | None = None, *, served_model_name: str | None = None,
               adapter_root: str | None = None, api_key: str | None = None, max_tokens_cap: int = 512,
               max_prompts: int | None = None, max_chat_turns: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app serving `mt` (a MultiTaskModel) through `engine`; serve it with `run` or any ASGI server.

    Args:
        engine: the Engine that owns `mt` (default: one with its default settings); the app starts it
            and, at shutdown, drains and stops it. Its max_num_seqs and max_model_len are the app's too.
        served_model_name: the base model's id in /v1/models and errors (default: lora.models.model_name).
        adapter_root: the one folder /v1/load_lora_adapter reads from (None: loading at run time is off).
        api_key: required as a bearer token on every endpoint but /health.
        max_tokens_cap: the most tokens one request may ask for.
        max_prompts: the most prompts x n in one request (default: the engine's max_num_seqs).
        max_chat_turns: the most messages in one chat request.
        max_body_bytes: request bodies over this get 413.
        body_timeout: seconds a request body may take to arrive; then 408.
    """
    engine = engine or Engine(mt)
    name = served_model_name or model_name(mt.pretrained_model.config)
    models = ServedModels(mt, engine, name, adapter_root)
    limits = Limits(max_tokens_cap=max_tokens_cap, max_prompts=max_prompts or engine.max_num_seqs,
                    context_length=engine.max_model_len, max_chat_turns=max_chat_turns,
                    # no token spans more characters than the longest in the vocabulary: see check_text_length
                    max_token_chars=max(map(len, mt.tokenizer.get_vocab()), default=1))
    serving = Serving(mt, engine, models, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # The drain is over: what is left is aborted or short. Bounded all the same, so an engine thread
            # that hangs cannot keep the process from exiting.
            engine.shutdown(timeout=ENGINE_STOP_TIMEOUT)
            serving.close()

    app = FastAPI(title="lora-pytorch", lifespan=lifespan)
    app.state.serving, app.state.draining, app.state.in_flight = serving, False, 0
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes,  # type: ignore[arg-type]
                       body_timeout=body_timeout)
    app.include_router(router)
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    return app


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, still answered in OpenAI's shape (uvicorn logs the traceback)."""
    return APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                    type="server_error").response()


class DrainingServer(uvicorn.Server):
    """uvicorn with a bounded graceful drain: after the first SIGTERM/SIGINT the socket stays open, /health
    answers 503 and new requests get 503 while those in flight finish; then the server exits. After
    `shutdown_timeout` seconds the connections still open are closed; a second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
        config.http = GuardedH11Protocol  # see gate.py: bodies in tiny pieces
        super().__init__(config)
        app: Any = config.app  # the FastAPI app of create_app
        self.app_state = app.state
        self.shutdown_timeout, self.drain_deadline = shutdown_timeout, float("inf")

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.app_state
        if state.draining:
            return super().handle_exit(sig, frame)
        log.info("draining: %d request(s) in flight, for at most %g s", state.in_flight, self.shutdown_timeout)
        state.draining, self.drain_deadline = True, time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        state = self.app_state
        if state.draining and state.in_flight == 0:
            self.should_exit = True
        elif state.draining and time.monotonic() > self.drain_deadline:
            log.warning("drain deadline (--shutdown-timeout %g s) passed: closing %d connection(s)",
                        self.shutdown_timeout, len(self.server_state.connections))
            for connection in list(self.server_state.connections):
                connection.transport.close()  # type: ignore[attr-defined]  # the client sees the end of the stream
            self.should_exit = True
        return await super().on_tick(counter)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Serve `app` until SIGTERM or Ctrl-C, then finish what is in flight (for at most shutdown_timeout s)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, shutdown_timeout).run()
