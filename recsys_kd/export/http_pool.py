"""The HTTP server's connection handling under load, on the standard library alone.

:class:`PooledHTTPServer` replaces ``ThreadingHTTPServer`` (one new OS thread per connection, no cap,
listen backlog 5, a per-read timeout that a client trickling one header line at a time never trips):

- a fixed pool of ``workers`` threads takes accepted connections from a queue of at most
  ``queue_size``; when every worker is busy and the queue is full, the accepting thread answers
  ``503`` at once (non-blocking send, ``Retry-After: 1``) instead of letting the client stall;
- the listen backlog is ``backlog`` (default 128), so a burst of connects is not dropped by the kernel
  (a dropped SYN is retried only after ~1 s);
- :class:`DeadlineRequestHandler` reads each request under one whole-request deadline: request line,
  headers and body must all arrive within ``request_timeout`` seconds of a worker taking the
  connection (the answer gets ``408``); writing the answer has the same limit, so a client that
  never reads frees its worker too;
- ``server_close`` is graceful: connections still queued (not yet read) get ``503``, requests in
  flight are answered, then the workers are joined.

A refused or answered connection is half-closed and what the client sent is drained before the close,
so that its unread bytes do not turn the close into a reset that could destroy the answer; refused
connections linger (at most ``MAX_LINGERING`` of them, ``LINGER_S`` each) for the same reason.
"""

from __future__ import annotations

import collections
import io
import json
import queue
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Deque, List, Optional, Tuple

DEFAULT_WORKERS = 8
DEFAULT_QUEUE_SIZE = 64
DEFAULT_BACKLOG = 128
DEFAULT_REQUEST_TIMEOUT_S = 10.0
LINGER_S = 1.0
MAX_LINGERING = 256
DRAIN_BYTES = 1 << 20


def refusal(status: int, phrase: str, message: str) -> bytes:
    """A complete HTTP/1.0 answer with a JSON ``{"error": message}`` body."""
    body = (json.dumps({"error": message}) + "\n").encode("utf-8")
    head = (f"HTTP/1.0 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


def _drain(connection: socket.socket) -> None:
    """Reads, without blocking, what the client already sent (at most ``DRAIN_BYTES``)."""
    drained = 0
    try:
        connection.setblocking(False)
        while drained < DRAIN_BYTES:
            chunk = connection.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:  # BlockingIOError: nothing more for now; anything else: the connection is gone
        return


class PooledHTTPServer(HTTPServer):
    """
    An ``HTTPServer`` whose connections run on a fixed pool of worker threads (see the module doc).

    Args:
        address: ``(host, port)``; port 0 picks a free one.
        handler: the request handler class (a :class:`DeadlineRequestHandler`).
        workers: handler threads; at most this many requests are read or answered at once.
        queue_size: accepted connections waiting for a worker; one more gets ``503``.
        backlog: the listen backlog (connections the kernel holds before they are accepted).
        request_timeout: seconds for a whole request (line, headers, body) to arrive, and for its
            answer to be taken.
        quiet: no log lines on stderr.
    """

    def __init__(self, address: Tuple[str, int], handler: type, workers: int = DEFAULT_WORKERS,
                 queue_size: int = DEFAULT_QUEUE_SIZE, backlog: int = DEFAULT_BACKLOG,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, quiet: bool = False) -> None:
        if min(workers, queue_size, backlog) < 1 or not request_timeout > 0:
            raise ValueError("workers, queue_size and backlog must be >= 1 and request_timeout > 0")
        self.workers = workers
        self.queue_size = queue_size
        self.request_queue_size = backlog  # socketserver's name for the listen backlog
        self.request_timeout = float(request_timeout)
        self.quiet = quiet
        self.busy_answer = refusal(503, "Service Unavailable", f"server busy: all {workers} workers and the "
                                   f"queue of {queue_size} connections are taken; retry later")
        self._pending: "queue.Queue[Optional[Tuple[socket.socket, Any]]]" = queue.Queue(queue_size)
        self._lingering: Deque[Tuple[float, socket.socket]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._threads: List[threading.Thread] = []  # server_close runs inside a failed bind
        super().__init__(address, handler)  # binds and listens; raises OSError before any thread starts
        self._threads = [threading.Thread(target=self._work, name=f"recsys-kd-serve-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """On the accepting thread: queue the connection for a worker, or refuse it at once."""
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:
            self.refuse(request, self.busy_answer)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def refuse(self, request: socket.socket, answer: bytes, linger: bool = True) -> None:
        """Answers a connection without reading its request and without blocking, then closes it
        (after ``LINGER_S``, from the serving loop, when ``linger``)."""
        _drain(request)
        try:
            request.send(answer)  # a fresh socket's send buffer takes a small answer whole
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not linger:
            request.close()
            return
        with self._lock:
            self._lingering.append((time.monotonic() + LINGER_S, request))
            while len(self._lingering) > MAX_LINGERING:
                self._lingering.popleft()[1].close()

    def service_actions(self) -> None:
        """Each turn of the serving loop: close the refused connections whose linger is over."""
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            while self._lingering and self._lingering[0][0] <= now:
                _, request = self._lingering.popleft()
                _drain(request)
                request.close()

    def shutdown_request(self, request: socket.socket) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _drain(request)
        request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or stalls is one log line, not a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            if not self.quiet:
                print(f"{client_address[0]}: connection dropped: {type(error).__name__}: {error}", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        """Stops listening, answers ``503`` to connections still queued, lets the workers finish the
        requests in flight and joins them. Call after ``shutdown()`` (or before ``serve_forever``)."""
        super().server_close()
        if self._closed:
            return
        self._closed = True
        closing = refusal(503, "Service Unavailable", "server shutting down; retry later")
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.refuse(item[0], closing, linger=False)
        for _ in self._threads:
            self._pending.put(None)
        for thread in self._threads:
            thread.join()
        with self._lock:
            while self._lingering:
                self._lingering.popleft()[1].close()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads under one deadline: each ``recv`` waits at most until it, then ``TimeoutError``."""

    def __init__(self, connection: socket.socket, seconds: float) -> None:
        super().__init__()
        self.connection = connection
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            raise TimeoutError(f"the request did not arrive within {self.seconds:g} s")
        self.connection.settimeout(remaining)
        try:
            return self.connection.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise TimeoutError(f"the request did not arrive within {self.seconds:g} s") from None


class DeadlineRequestHandler(BaseHTTPRequestHandler):
    """
    A request handler for :class:`PooledHTTPServer`: one request per connection (HTTP/1.0, so no idle
    keep-alive connection holds a worker), read under the server's whole-request deadline; a request
    that misses it gets ``408`` (``send_error``). ``self.answered`` tells whether an answer was started.
    """

    server: PooledHTTPServer
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file: replaced by one under the deadline
        self.reader = _DeadlineReader(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.answered = False
        # what send_error needs when the request line never arrived
        self.command, self.request_version, self.requestline = None, self.default_request_version, ""

    def handle_one_request(self) -> None:
        super().handle_one_request()  # a TimeoutError there is logged and ends the request
        if self.reader.expired and not self.answered:
            self.close_connection = True
            try:
                self.send_error(408, None, f"the whole request must arrive within {self.reader.seconds:g} s")
            except OSError:
                pass

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self.answered = True
        self.connection.settimeout(self.server.request_timeout)  # a client that never reads frees the worker
        super().send_response(code, message)
