"""What stands between the network and llorch-cpud's routes (docs/specs/14-worker-daemon.md, "Security").

- `HttpGuard`, an ASGI middleware: a request id on every response, the Host allow-list (DNS rebinding), CORS
  for listed origins only, the API key, 503 with `Connection: close` while draining, `application/json`
  bodies only (the text/plain CSRF path), and a catch-all that turns an unexpected error into a logged 500
  carrying the request id.
- `guarded_protocol`, uvicorn's h11 protocol with a deadline for reading each request (slowloris) and
  `/health` exempt from the connection cap.
- `quiet_floods`: running out of file descriptors logs one line every few seconds, not a traceback per
  failed accept(); warnings clients can cause at will are rate-limited the same way.
- `guard_stream`: a response stream that fails mid-way ends with an error event, not a reset connection.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import h11
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llorch.http")

REFUSAL_LOG_INTERVAL_S = 10.0
ROUTES = ("/health", "/execute", "/cancel", "/v1/models", "/v1/completions", "/metrics")   # metric labels
PUBLIC = {("GET", "/health"), ("HEAD", "/health")}   # a probe answers without the key
PREFLIGHT = [(b"access-control-allow-methods", b"GET, POST"),   # what a listed origin may send
             (b"access-control-allow-headers", b"Authorization, Content-Type"), (b"access-control-max-age", b"600")]


class RateLimitedWarnings(logging.Filter):
    """A logger filter passing each kind of WARNING (its message template, before the arguments are filled
    in) at most once per interval; the next one that passes says how many were left out. Keyed by template,
    the kinds are few however varied the requests that cause them."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        kind, now = str(record.msg), time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.interval_s:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return False
        self._last[kind] = now
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            record.msg = f"{record.msg} (and {left_out} more like it since the last such line)"
        return True


# what clients can cause at will: refusals, timeouts, running out of descriptors
refusals = logging.getLogger("llorch.http.refused")
refusals.addFilter(RateLimitedWarnings(REFUSAL_LOG_INTERVAL_S))


# ---- error bodies, in the shape of the route's API ----

def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {message, type, param, code}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(path: str, status: int, field: str, constraint: str, message: str) -> dict:
    """A refusal in OpenAI's shape on /v1/* routes, in the worker contract's {"errors": [...]} elsewhere."""
    if path.startswith("/v1/"):
        return openai_error_body(status, message, code=constraint)
    return {"errors": [{"field": field, "constraint": constraint, "message": message}]}


def json_bytes(content: object) -> bytes:
    """JSON that can always be sent: non-ASCII escaped, so even a lone surrogate echoed back encodes."""
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def send_json(send, status: int, content: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json_bytes(content)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


# ---- the middleware ----

@dataclass(frozen=True)
class Policy:
    api_key: str | None                       # None: no authentication
    allowed_hosts: frozenset[str] | None      # Host header names accepted; None: any
    cors_origins: frozenset[str]              # origins a browser may call from; empty: none


def host_name(host_header: str) -> str:
    """The host of a Host header, without its port: "[::1]:8080" -> "::1", "localhost:80" -> "localhost"."""
    if host_header.startswith("["):
        return host_header[1:host_header.find("]")].lower()
    return host_header.rsplit(":", 1)[0].lower() if host_header.count(":") == 1 else host_header.lower()


def is_preflight(scope, headers: Headers) -> bool:
    return scope["method"] == "OPTIONS" and "access-control-request-method" in headers


def authorized(headers: Headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the first differing byte: the key cannot be guessed byte by byte
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class HttpGuard:
    """ASGI middleware run around every route (installed inside Starlette's own error middleware, so that
    the catch-all here sees a route's exception before Starlette's plain-text 500 would)."""

    def __init__(self, app, *, policy: Policy, draining: Callable[[], bool],
                 on_response: Callable[[str, int], None]) -> None:
        self.app, self.policy, self.draining, self.on_response = app, policy, draining, on_response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        headers, path = Headers(scope=scope), scope["path"]
        origin = headers.get("origin")
        extra = [(b"x-request-id", request_id.encode())]
        if origin in self.policy.cors_origins:
            extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
                      (b"access-control-expose-headers", b"X-Request-Id")]
        if self.draining():
            extra.append((b"connection", b"close"))   # the client must not send more on this connection
        status = None   # until the response starts

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self.refusal(scope, headers)
            if refusal:
                code, field, constraint, message, more = refusal
                refusals.warning(f"request refused with {code}: %s %s: %s", scope["method"], path, message)
                await send_json(send_with_headers, code, error_body(path, code, field, constraint, message),
                                more)
            elif is_preflight(scope, headers):   # from an allowed origin, or refusal() would have said no
                await send_with_headers({"type": "http.response.start", "status": 204, "headers": PREFLIGHT})
                await send_with_headers({"type": "http.response.body", "body": b""})
            else:
                await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:   # the client left while its body was being read: nobody to answer
            status = 499
        except Exception:
            log.exception("internal error in %s %s (request id %s)", scope["method"], path, request_id,
                          extra={"request_id": request_id})
            if status is None:   # no response started yet: the client gets the request id to report
                body = error_body(path, 500, "request", "internal", f"internal error (request id {request_id})")
                await send_json(send_with_headers, 500, {**body, "request_id": request_id})
        finally:
            self.on_response(path if path in ROUTES else "other", status or 500)

    def refusal(self, scope, headers: Headers) -> tuple[int, str, str, str, list] | None:
        """(status, field, constraint, message, extra headers) for a request refused before any route."""
        policy, method, path = self.policy, scope["method"], scope["path"]
        if policy.allowed_hosts is not None and host_name(headers.get("host", "")) not in policy.allowed_hosts:
            return 400, "host", "host", "the Host header names a host this worker does not serve", []
        if is_preflight(scope, headers):   # carries no credentials: the origin decides
            if headers.get("origin") not in policy.cors_origins:
                return 400, "origin", "cors", "cross-origin requests from this origin are not allowed", []
            return None
        if policy.api_key is not None and (method, path) not in PUBLIC and not authorized(headers, policy.api_key):
            return 401, "authorization", "invalid_api_key", "a valid API key is required: Authorization: " \
                   "Bearer KEY", [(b"www-authenticate", b"Bearer")]
        if self.draining() and (method, path) not in PUBLIC:
            return 503, "worker", "available", "the worker is shutting down", [(b"retry-after", b"1")]
        if method == "POST" and headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "content-type", "content_type", "the body must be JSON, sent as Content-Type: " \
                   "application/json", []
        return None


# ---- streams ----

async def guard_stream(chunks: AsyncIterator[str], error_chunk: Callable[[str], str], request_id: str
                       ) -> AsyncIterator[bytes]:
    """chunks, encoded; an error while producing or encoding one ends the stream with error_chunk(request_id)
    (logged with the request id) instead of a connection reset in the middle of the response."""
    async with contextlib.aclosing(chunks):   # closing it runs its cleanup, e.g. cancelling the job
        try:
            async for chunk in chunks:
                yield chunk.encode("utf-8")
        except Exception:
            log.exception("stream failed (request id %s)", request_id, extra={"request_id": request_id})
            yield error_chunk(request_id).encode("utf-8")


# ---- connections ----

def guarded_protocol(read_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with two changes:
    - a request must be read in full (headers and body) within read_timeout_s of its first byte, and a new
      connection must send one within read_timeout_s: a slowloris client, which sends a byte now and then to
      hold a connection forever, is closed. uvicorn itself only times out idle keep-alive connections.
    - GET /health is exempt from the connection cap (uvicorn answers other requests 503 beyond it), so the
      orchestrator's probe still sees the worker under load."""

    class GuardedH11Protocol(H11Protocol):
        _read_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read_deadline()

        def data_received(self, data: bytes) -> None:
            if self._read_deadline is None:
                self._arm_read_deadline()
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):   # the request is read in full
                self._disarm_read_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._read_deadline = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "a client"
                refusals.warning("closed the connection from %s: no complete request within %g s", client,
                                 read_timeout_s)
                self.transport.close()   # a route still reading the body sees the client disconnect

        @property
        def limit_concurrency(self) -> int | None:   # read by H11Protocol once a request's head is parsed
            if self.scope is not None and self.scope["path"] == "/health":
                return None
            return self._connection_cap

        @limit_concurrency.setter
        def limit_concurrency(self, value: int | None) -> None:
            self._connection_cap = value

    return GuardedH11Protocol


OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def quiet_floods(loop) -> None:
    """Log running out of file descriptors (or socket buffers) as one warning every few seconds, and so
    uvicorn's warnings for each request beyond the connection cap or each invalid request.
    asyncio's accept loop reports each failed accept() to the loop's exception handler, whose default logs a
    traceback, and retries up to the listen backlog times per second: tens of thousands of tracebacks a
    second. It keeps retrying, so connections are accepted again once descriptors are free."""
    logging.getLogger("uvicorn.error").addFilter(RateLimitedWarnings(REFUSAL_LOG_INTERVAL_S))
    def handler(loop, context: dict) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in OUT_OF_RESOURCES:
            refusals.warning("cannot accept connections: %s (see ulimit -n and --max-connections)", error.strerror)
        else:
            loop.default_exception_handler(context)
    loop.set_exception_handler(handler)
