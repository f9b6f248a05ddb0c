"""A real threaded HTTP server on 127.0.0.1 for tests: canned responses, recorded requests.

Usage::

    with LoopbackHTTPServer({"/data/upload/1/a.png": Response(body=png_bytes)}) as server:
        requests.get(server.url("/data/upload/1/a.png"))
        assert server.requests[0].header("authorization") == "Token abc"

Routes map a path (with or without query string; an exact ``path?query`` match wins over the bare
path) to a :class:`Response`, a ``(status, headers, body)`` tuple, or a callable taking the
:class:`RecordedRequest` and returning either. Unknown paths answer 404. Routes may be changed
while the server runs (``server.routes[path] = ...``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Response:
    """A canned answer.

    Attributes:
        status: HTTP status code.
        body: response body bytes.
        headers: extra response headers (``Content-Length`` is added unless ``send_length`` is
            False, in which case the body ends when the connection closes).
        delay: seconds to wait before sending the status line (to provoke client timeouts).
        chunk_size: body bytes written per write when ``chunk_delay`` > 0.
        chunk_delay: seconds to wait between body chunks (a slow, dripping server).
        send_length: whether to send ``Content-Length``.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_size: int = 65536
    chunk_delay: float = 0.0
    send_length: bool = True


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received: method, path with query, headers, body bytes."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


Handler = Response | tuple | Callable[[RecordedRequest], Response | tuple]


def _as_response(answer: Response | tuple) -> Response:
    if isinstance(answer, Response):
        return answer
    status, headers, body = answer
    return Response(status=status, headers=dict(headers or {}), body=body)


class LoopbackHTTPServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 and a free port, started by ``start``/``with``."""

    def __init__(self, routes: Mapping[str, Handler] | None = None) -> None:
        self.routes: dict[str, Handler] = dict(routes or {})
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # ------------------------------------------------------------------ inspection

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Recorded requests whose path (without query) equals ``path``."""
        with self._lock:
            return [request for request in self.requests if urlsplit(request.path).path == path]

    # ------------------------------------------------------------------ internals

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _answer(self, request: RecordedRequest) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            handler = self.routes.get(urlsplit(request.path).path)
        if handler is None:
            return Response(status=404, body=b"not found")
        if callable(handler):
            handler = handler(request)
        return _as_response(handler)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; returns False when it is."""
        return not self._stopping.wait(seconds) if seconds > 0 else not self._stopping.is_set()


def _make_handler(owner: LoopbackHTTPServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = RecordedRequest(
                method=self.command, path=self.path, headers=tuple(self.headers.items()), body=body
            )
            owner._record(request)
            response = owner._answer(request)
            if not owner._sleep(response.delay):
                return
            # the client may give up (timeout, size limit): expected in tests
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send(response)

        def _send(self, response: Response) -> None:
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            if response.send_length:
                self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if response.chunk_delay <= 0:
                self.wfile.write(response.body)
                return
            for start in range(0, len(response.body), response.chunk_size):
                self.wfile.write(response.body[start : start + response.chunk_size])
                self.wfile.flush()
                if not owner._sleep(response.chunk_delay):
                    return

        do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
            return

    return _Handler


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
