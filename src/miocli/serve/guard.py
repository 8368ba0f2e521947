"""What every request of `mio serve` passes before a route sees it: an ASGI middleware.

A keyless server on loopback is reachable by every web page the user opens, so the guard refuses
what only a browser attack sends: a `Host` that is not this server's own (DNS rebinding), an
`Origin` that is not its own or an `--allow-origin` (cross-site requests), and a POST whose
`Content-Type` is not the route's (text/plain is the CORS "simple request" that needs no
preflight). Then the API key, then the body: read here in full, counted as it arrives, refused
with 413 the moment it passes --max-body-mb (whatever Content-Length says, chunked bodies too),
and handed to the route from memory. On shutdown, uploads still arriving are ended with a 503.
One log line per request. `read_json_body` parses large bodies off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from miocli.errors import UsageError
from miocli.serve.worker import ServeSettings, log

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOOPBACK = ("localhost", "127.0.0.1", "::1")
# These two routes take uploads; every other POST takes JSON.
MULTIPART_ROUTES = ("/v1/images/edits", "/v1/audio/transcriptions")
# Above this a JSON body is parsed in a thread, so that the loop keeps serving the others meanwhile.
OFF_LOOP_BYTES = 2**20
PREFLIGHT_MAX_AGE_S = 600
CODES = {401: "invalid_api_key", 403: "forbidden", 413: "request_too_large", 415: "unsupported_media_type",
         503: "server_shutting_down"}


@dataclass(frozen=True)
class GuardSettings:
    """`--allow-host` and `--allow-origin` as given (`*` turns that check off)."""

    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()


def check_allowed(hosts: list[str], origins: list[str]) -> GuardSettings:
    """The options, checked and normalized (lower case, no trailing slash)."""
    clean_hosts = []
    for name in hosts:
        value = name.strip().lower()
        if not value or any(c in value for c in "/ @?#"):
            raise UsageError(f"--allow-host {name!r} is not a host name", hint="give e.g. mio.example.com, "
                             "mio.example.com:8443, or * for any")
        clean_hosts.append(value)
    clean_origins = []
    for origin in origins:
        value = origin.strip().lower().rstrip("/")
        scheme, _, rest = value.partition("://")
        if value not in ("*", "null") and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise UsageError(f"--allow-origin {origin!r} is not an origin",
                             hint="give scheme://host[:port], e.g. http://localhost:3000, or * for any")
        clean_origins.append(value)
    return GuardSettings(tuple(clean_hosts), tuple(clean_origins))


def split_host(value: str) -> tuple[str, int | None] | None:
    """'Name:port', '[::1]:port' or a bare name → (lower-case name without brackets, port); None if unreadable."""
    value = value.strip().lower()
    port_text = ""
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    elif value.count(":") == 1:
        name, _, port_text = value.partition(":")
    elif ":" in value:  # a bare IPv6 address is not a valid Host header
        return None
    else:
        name = value
    if port_text and not port_text.isdigit():
        return None
    return name, int(port_text) if port_text else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Refusal(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None, kind: str = "UsageError") -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.kind = status, message, hint, kind

    async def send(self, send: Send, path: str, close: bool = False) -> None:
        if path.startswith("/v1/") and not path.startswith("/v1/run/"):
            # OpenAI's shape on its routes, so that its clients show the message.
            text = f"{self.message} ({self.hint})" if self.hint else self.message
            error: dict[str, Any] = {"message": text, "param": None, "code": CODES.get(self.status),
                                     "type": "server_error" if self.status >= 500 else "invalid_request_error"}
        else:
            # The native shape, with OpenAI's `param` and `code` so OpenAI clients read it too.
            error = {"type": self.kind, "message": self.message, "hint": self.hint,
                     "exit_code": 3 if self.kind != "UsageError" else 2, "param": None, "code": None}
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:  # the rest of the body is never read: the connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _ClientGone(Exception):
    """The client hung up while sending its body: nobody to answer."""


@dataclass
class GuardState:
    """Shared with `serve()`: requests in progress, and the uploads to end when the server stops."""

    active: int = 0
    closing: bool = False
    uploads: set[asyncio.Task[Any]] = field(default_factory=set)

    def close(self) -> None:
        """End every body still arriving (a client stuck half-way must not hold the shutdown)."""
        self.closing = True
        for task in list(self.uploads):
            task.cancel()


class Guard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], settings: ServeSettings,
                 allowed: GuardSettings, state: GuardState) -> None:
        self.app, self.settings, self.state = app, settings, state
        self.port = settings.port
        bound = settings.host.strip("[]").lower()
        self.loopback = bound in LOOPBACK
        self.any_host = "*" in allowed.allow_hosts
        self.any_origin = "*" in allowed.allow_origins
        self.names = {*LOOPBACK, bound}
        if not self.loopback:
            # Beyond loopback clients name the machine; an IP literal cannot be rebound to another site.
            self.names.add(socket.gethostname().lower())
        self.extra_hosts = {h for h in allowed.allow_hosts if h != "*"}
        self.origins = {o for o in allowed.allow_origins if o != "*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begin = time.perf_counter()
        status = [0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cors: list[tuple[bytes, bytes]] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        self.state.active += 1
        try:
            origin = self._check_browser(scope, headers)
            if origin is not None and origin != _own_origin(scope, headers):
                cors.append((b"access-control-allow-origin", origin.encode("latin-1")))
                cors.append((b"vary", b"Origin"))
                if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                    await self._preflight(headers, sending)
                    return
            self._check_request(scope, headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = _replay(await self._read_body(receive, headers), receive)
            await self.app(scope, receive, sending)
        except _Refusal as refusal:
            await refusal.send(sending, scope.get("path", ""), close=refusal.status in (413, 503))
        except _ClientGone:
            pass
        finally:
            self.state.active -= 1
            client = scope.get("client") or ("-",)
            log(f"{client[0]} {scope['method']} {scope.get('path', '')} {status[0] or 'hung up'} "
                f"{time.perf_counter() - begin:.3f}s")

    def _check_browser(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """Host and Origin; returns the Origin (lower case) when there is one and it is allowed."""
        host = headers.get("host", "")
        if host and not self.any_host and not self._host_allowed(host, ip_ok=not self.loopback):
            raise _Refusal(403, f"the Host {host!r} is not this server's name",
                           "call it as http://127.0.0.1:PORT or localhost, or start it with --allow-host NAME")
        origin = headers.get("origin")
        if origin is None:
            return None  # not a browser's cross-site request: curl, SDKs, same-origin navigation
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins or origin == _own_origin(scope, headers):
            return origin
        scheme, _, netloc = origin.partition("://")
        if scheme in ("http", "https") and self._host_allowed(netloc, ip_ok=False):
            return origin  # a page of this same server under another of its names
        raise _Refusal(403, f"requests from the web page {origin!r} are not allowed",
                       "only this server's own page may call it; start it with --allow-origin ORIGIN to allow "
                       "another")

    def _host_allowed(self, value: str, ip_ok: bool) -> bool:
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        if name in self.extra_hosts or f"{name}:{port}" in self.extra_hosts:
            return True
        if port != self.port and not (port is None and self.port == 80):
            return False
        return name in self.names or (ip_ok and _is_ip(name))

    async def _preflight(self, headers: dict[str, str], send: Send) -> None:
        asked = headers.get("access-control-request-headers", "")
        allow = [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                 (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode())]
        if asked:
            allow.append((b"access-control-allow-headers", asked.encode("latin-1")))
        await send({"type": "http.response.start", "status": 204, "headers": allow})
        await send({"type": "http.response.body", "body": b""})

    def _check_request(self, scope: Scope, headers: dict[str, str]) -> None:
        """The key, a declared length over the limit and the Content-Type of a POST."""
        path, method = scope.get("path", ""), scope["method"]
        # The page itself holds no secret: it loads without the key and asks for it before calling the API.
        public = method == "GET" and (path == "/" or path.startswith("/playground/"))
        key = self.settings.api_key
        if key is not None and not public and not _authorized(headers, key):
            raise _Refusal(401, "a valid API key is needed", "send it as 'Authorization: Bearer KEY' (MIO_API_KEY)")
        length = headers.get("content-length")
        if "transfer-encoding" not in headers and length is not None and (
                not length.isdigit() or int(length) > self.settings.max_body_bytes):
            raise self._too_large()
        if method == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            wanted = "multipart/form-data" if path in MULTIPART_ROUTES else "application/json"
            if media != wanted:
                raise _Refusal(415, f"POST {path} takes Content-Type: {wanted} (got {media or 'none'})",
                               "send the body with that Content-Type header")

    def _too_large(self) -> _Refusal:
        return _Refusal(413, f"the request body is larger than {self.settings.max_body_bytes // 2**20} MiB",
                        "send fewer or smaller inputs per request")

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        """The whole body, refused with 413 as soon as more than the limit has arrived."""
        limit, size = self.settings.max_body_bytes, 0
        chunks: list[bytes] = []
        task = asyncio.current_task()
        if task is not None:
            self.state.uploads.add(task)
        try:
            if self.state.closing:
                raise asyncio.CancelledError
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise self._too_large()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except asyncio.CancelledError:
            if not self.state.closing or task is None:
                raise
            task.uncancel()
            raise _Refusal(503, "the server is shutting down", "send the request again once it is back",
                           kind="EnvironmentProblem") from None
        finally:
            if task is not None:
                self.state.uploads.discard(task)


def _own_origin(scope: Scope, headers: dict[str, str]) -> str:
    return f"{scope.get('scheme', 'http')}://{headers.get('host', '').lower()}"


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, then the connection's own messages (a route still learns that its client hung up)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _authorized(headers: dict[str, str], key: str) -> bool:
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return hmac.compare_digest(token.encode(), key.encode())


async def read_json_body(request: Any) -> Any:
    """The request's JSON; a large body is parsed in a thread so the loop serves other requests meanwhile."""
    raw = await request.body()
    try:
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(json.loads, raw)
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"the request body is not valid JSON ({str(exc)[:120]})") from None
