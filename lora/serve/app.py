"""The ASGI app: middleware (auth, body limit, drain), error handlers, lifespan, and `run` with a graceful drain."""
import contextlib
import hmac
import logging
import os

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from .protocol import APIError, validation_error
from .routes import router
from .serving import Serving

log = logging.getLogger("lora.serve")
MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = ("/health",)  # no key needed
DRAIN_OPEN_PATHS = ("/health", "/metrics")  # answered while draining (/health with 503)


class Gate:
    """ASGI middleware in front of every route: 503 once draining, bearer-token auth, and the body-size
    limit, counted as the bytes arrive (a chunked body has no Content-Length to trust). It also counts
    the requests in flight, which the drain waits for."""

    def __init__(self, app, api_key=None, max_body_bytes=MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        error = self.check(scope, state.draining)
        if error is not None:
            return await error.response()(scope, receive, send)
        state.in_flight += 1
        try:
            body = await self.read_body(receive)
            if isinstance(body, APIError):
                return await body.response()(scope, receive, send)
            if body is not None:
                await self.app(scope, replay(body, receive), send)
        finally:
            state.in_flight -= 1

    def check(self, scope, draining):
        path, headers = scope["path"], dict(scope["headers"])
        if draining and path not in DRAIN_OPEN_PATHS:
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self.too_large()
        return None

    def too_large(self):
        return APIError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")

    async def read_body(self, receive):
        """The whole body, an APIError once it passes the limit, or None if the client went away."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body, receive):
    """A `receive` that hands the app the body already read, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


def create_app(mt, engine=None, *, served_model_name=None, adapter_root=None, api_key=None, max_tokens_cap=512,
               max_prompts=None, context_length=None, max_body_bytes=MAX_BODY_BYTES):
    """The FastAPI app serving `mt` (a MultiTaskModel) through `engine`; serve it with `run` or any ASGI server.

    Args:
        engine: the Engine that owns `mt` (default: one with its default settings); the app starts it
            and, at shutdown, drains and stops it.
        served_model_name: the base model's id in /v1/models and errors (default: the model folder's name).
        adapter_root: the one folder /v1/load_lora_adapter reads from (None: loading at run time is off).
        api_key: required as a bearer token on every endpoint but /health.
        max_tokens_cap: the most tokens one request may ask for.
        max_prompts: the most prompts x n in one request (default: the engine's max_num_seqs).
        context_length: prompt plus completion tokens allowed (default: the model's max_position_embeddings).
        max_body_bytes: request bodies over this get 413.
    """
    engine = engine or Engine(mt)
    config = mt.pretrained_model.config
    serving = Serving(
        mt, engine, adapter_root=adapter_root, max_tokens_cap=max_tokens_cap,
        model_name=served_model_name or os.path.basename(os.path.normpath(config._name_or_path)),
        max_prompts=max_prompts or getattr(engine, "max_num_seqs", 16),
        context_length=context_length or getattr(engine, "max_model_len", None)
        or getattr(config, "max_position_embeddings", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            serving.close()

    app = FastAPI(title="lora-pytorch", lifespan=lifespan)
    app.state.serving, app.state.draining, app.state.in_flight = serving, False, 0
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    app.include_router(router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    return app


async def api_error(request, exc):
    return exc.response()


async def invalid_request(request, exc):
    return validation_error(exc).response()


async def http_error(request, exc):
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


async def internal_error(request, exc):
    """A bug, still answered in OpenAI's shape (uvicorn logs the traceback)."""
    return APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                    type="server_error").response()


class DrainingServer(uvicorn.Server):
    """uvicorn with a graceful drain: after the first SIGTERM/SIGINT the socket stays open, /health answers
    503 and new requests get 503 while those in flight finish; then the server exits. A second signal
    stops it without waiting for the drain."""

    def handle_exit(self, sig, frame):
        state = self.config.app.state
        if state.draining:
            return super().handle_exit(sig, frame)
        log.info("draining: %d request(s) in flight", state.in_flight)
        state.draining = True

    async def on_tick(self, counter):
        state = self.config.app.state
        if state.draining and state.in_flight == 0:
            self.should_exit = True
        return await super().on_tick(counter)


def run(app, host="127.0.0.1", port=8000, log_level="info"):
    """Serve `app` until SIGTERM or Ctrl-C, then finish what is in flight and exit."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
