"""In front of every route: drain, API key, body size, body read deadline (ASGI) and body pieces (HTTP)."""
import asyncio
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT = 30.0
MAX_BODY_PIECES = 8192  # a 1 MiB body sent in pieces of 128 bytes on average; TCP delivers far bigger ones
OPEN_PATHS = ("/health",)  # no key needed
DRAIN_OPEN_PATHS = ("/health", "/metrics")  # answered while draining (/health with 503)
# After a 408 or 413 the rest of the body is never read, so the connection cannot carry another request: closed
# at once, not held until the keep-alive timeout.
CLOSE = {"Connection": "close"}


class RequestGuard:
    """503 once draining, bearer-token auth, and the body read whole before any route sees it: its size
    counted as the bytes arrive (a chunked body has no Content-Length to trust) and its arrival bounded
    by a deadline (408), so a client that stalls mid-body holds neither a worker nor the drain. It also
    counts the requests in flight, which the drain waits for."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        # Compared as UTF-8 bytes: HTTP headers arrive as bytes, and a non-ASCII key must match itself.
        self.api_key = None if api_key is None else api_key.encode("utf-8")

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
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
                replayed = replay(body, receive)
                del body  # the route takes it from `replayed` and keeps only what it needs
                await self.app(scope, replayed, send)
        finally:
            state.in_flight -= 1

    def check(self, scope: MutableMapping[str, Any], draining: bool) -> APIError | None:
        path, headers = scope["path"], dict(scope["headers"])
        if draining and path not in DRAIN_OPEN_PATHS:
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large",
                        headers=CLOSE)

    async def read_body(self, receive: Receive) -> bytes | APIError | None:
        """The whole body, an APIError once it passes the limit or the deadline, or None if the client left."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
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
        except TimeoutError:
            return APIError(408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout); "
                            "send it whole and without pauses", code="request_timeout", headers=CLOSE)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then whatever the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()
    return replayed


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, which closes a connection whose request body comes in over MAX_BODY_PIECES
    pieces: each piece costs Python work on the event loop (1 MB in 1-byte chunks stalled it for seconds),
    and no ASGI middleware sees the pieces, only what uvicorn has joined of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pieces = 0
        next_event = self.conn.next_event

        def counted() -> Any:
            event = next_event()
            if isinstance(event, h11.Request):
                self.pieces = 0
            elif isinstance(event, h11.Data):
                self.pieces += 1
                if self.pieces > MAX_BODY_PIECES:
                    self.transport.close()  # the app sees the client leave
                    return h11.PAUSED  # and nothing more of this connection is parsed
            return event
        self.conn.next_event = counted  # type: ignore[method-assign]
