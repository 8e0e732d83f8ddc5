"""The service's front door: one pure-ASGI middleware that decides on the headers alone.

In order, before a byte of the body is read:

1. **Origin** - a state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` header is present
   and names another site (or ``null``), or whose ``Sec-Fetch-Site`` says ``cross-site``, gets 403:
   a web page elsewhere cannot drive the service through the user's browser. CORS stays off.
2. **Token** - with a token set, every path but ``/``, ``/static/*`` and ``/healthz`` needs it
   (``Authorization: Bearer`` or ``X-API-Token``); 401 is answered from the headers, so an
   unauthenticated upload is never read, parsed or audited.
3. **Upload admission** (``POST /v1/predict``) - declared ``Content-Length`` over the limit: 413;
   more than ``max_uploads_per_client`` in flight from one client address: 429; more than
   ``max_uploads`` in flight, or the inference queue full: 503. All with ``Retry-After`` where a
   retry can help, and ``Connection: close`` (the unread body is not waited for).
4. **Body deadline** - the whole body must arrive within ``body_timeout_s`` of the headers; a client
   that stops sending gets 408 and its connection is closed (uvicorn has no body timeout).

Refusals by this middleware write no audit row (a flood of them would flood the log); they are
counted and summed up in one log line at most every :data:`REJECTION_LOG_INTERVAL_S` seconds.
The Host header is checked before all of this by Starlette's ``TrustedHostMiddleware``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import Counter
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers

log = logging.getLogger("covidcxr.serving")

PREDICT_PATH = "/v1/predict"
PUBLIC_PATHS = frozenset({"/", "/healthz", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RETRY_AFTER_S = 5
REJECTION_LOG_INTERVAL_S = 60.0
TOKEN_HELP = "missing or wrong API token: send `Authorization: Bearer <token>` or `X-API-Token: <token>`"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def token_matches(headers: Headers, token: str | None) -> bool:
    """Whether the request carries ``token`` (constant-time comparison); True when no token is set."""
    if token is None:
        return True
    given = None
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        given = value.strip()
    given = given or headers.get("x-api-token")
    return given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), token.encode())


def _netloc(scheme: str, hostport: str) -> str:
    """``host[:port]`` lower-cased, the scheme's default port dropped (``[::1]`` literals kept)."""
    hostport = hostport.strip().lower()
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[: end + 1], hostport[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    if port.isdigit() and int(port) == _DEFAULT_PORTS.get(scheme, -1):
        port = ""
    return f"{host}:{port}" if port else host


def origin_allowed(headers: Headers, allowed_origins: frozenset[str]) -> bool:
    """Same-origin (the Origin's host:port is the Host header's) or listed in ``allowed_origins``."""
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return False
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser (curl, scripts): nothing to forge
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed_origins:
        return True
    parts = urlsplit(origin)
    host = headers.get("host", "")
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc or not host:
        return False  # "null" (sandboxed frames, file:// pages) and anything unparsable
    # The scheme itself is not compared: behind a TLS proxy the browser says https, uvicorn sees http.
    return _netloc(parts.scheme, parts.netloc) == _netloc(parts.scheme, host)


class RejectionLog:
    """Counts refusals; logs one summary line at most every ``interval_s`` seconds (and at close)."""

    def __init__(self, interval_s: float = REJECTION_LOG_INTERVAL_S):
        self.interval_s = interval_s
        self.total: Counter = Counter()  # since start (tests, /healthz with token)
        self._window: Counter = Counter()
        self._last_emit = -float("inf")
        self._lock = threading.Lock()

    def count(self, status: int, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.total[(status, what)] += 1
            self._window[(status, what)] += 1
            if now - self._last_emit >= self.interval_s:
                self._emit(now)

    def _emit(self, now: float) -> None:
        if self._window:
            summary = ", ".join(f"{n} x {status} ({what})" for (status, what), n in sorted(self._window.items()))
            log.warning("refused requests since the last report: %s", summary)
        self._window.clear()
        self._last_emit = now

    def flush(self) -> None:
        with self._lock:
            self._emit(time.monotonic())


class BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s``."""


async def _respond(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ServiceGuard:
    """The middleware described in the module docstring; ``settings`` is a ``ServiceSettings``."""

    def __init__(self, app, *, settings, queue_full: Callable[[], bool] = lambda: False,
                 on_too_large: Callable[[int], Awaitable[None]] | None = None,
                 rejections: RejectionLog | None = None):
        self.app = app
        self.settings = settings
        self.queue_full = queue_full
        self.on_too_large = on_too_large
        self.rejections = rejections or RejectionLog()
        self.allowed_origins = frozenset(o.strip().rstrip("/").lower() for o in settings.allowed_origins)
        self.in_flight: Counter = Counter()  # client address -> uploads in flight
        self.in_flight_total = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        if method not in SAFE_METHODS and not origin_allowed(headers, self.allowed_origins):
            self.rejections.count(403, "cross-origin")
            await _respond(send, 403, "cross-origin request refused: this service only accepts state-changing "
                                      "requests from its own page (Origin / Sec-Fetch-Site say another site)")
            return
        if not is_public(path) and not token_matches(headers, settings.token):
            self.rejections.count(401, "missing or wrong token")
            await _respond(send, 401, TOKEN_HELP, {"WWW-Authenticate": "Bearer"})
            return
        if not (path == PREDICT_PATH and method == "POST"):
            await self.app(scope, receive, send)
            return
        await self._upload(scope, receive, send, headers)

    async def _upload(self, scope, receive, send, headers: Headers) -> None:
        settings = self.settings
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_upload_bytes:
            if self.on_too_large is not None:
                await self.on_too_large(int(declared))
            await _respond(send, 413, too_large_message(settings.max_upload_bytes))
            return
        client = (scope.get("client") or ("?", 0))[0]
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.in_flight[client] >= settings.max_uploads_per_client:
            self.rejections.count(429, "uploads per client")
            await _respond(send, 429, f"too many uploads at once from your address (the limit is "
                                      f"{settings.max_uploads_per_client}); wait for one to finish", retry)
            return
        if self.in_flight_total >= settings.max_uploads or self.queue_full():
            self.rejections.count(503, "service busy")
            await _respond(send, 503, f"the service is busy ({self.in_flight_total} uploads in flight); "
                                      f"try again in {RETRY_AFTER_S} s", retry)
            return
        self.in_flight[client] += 1
        self.in_flight_total += 1
        try:
            await self._with_body_deadline(scope, receive, send)
        finally:
            self.in_flight_total -= 1
            self.in_flight[client] -= 1
            if self.in_flight[client] <= 0:
                del self.in_flight[client]

    async def _with_body_deadline(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.body_timeout_s
        deadline = loop.time() + limit
        state = {"body_done": False, "timed_out": False, "started": False, "replaced": False}
        message_408 = (f"the upload did not arrive within {limit:g} s (body timeout); "
                       "send the whole file at once or raise --body-timeout")

        async def receive_with_deadline():
            if state["body_done"]:
                return await receive()  # waiting for a disconnect is not reading the body
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                state["timed_out"] = True
                raise BodyTimeout(message_408) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_guarded(message):
            if state["replaced"]:
                return  # the app's own answer to the failed read (a 400) is replaced by the 408
            if message["type"] == "http.response.start" and state["timed_out"]:
                state["replaced"] = state["started"] = True
                self.rejections.count(408, "body timeout")
                await _respond(send, 408, message_408)
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_with_deadline, send_guarded)
        except BodyTimeout:
            if not state["started"]:
                self.rejections.count(408, "body timeout")
                await _respond(send, 408, message_408)


def too_large_message(limit: int) -> str:
    return f"upload too large: the limit is {limit:,} bytes ({limit / 2**20:.1f} MiB)"
