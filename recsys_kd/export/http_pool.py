"""The HTTP server's connection handling under load, on the standard library alone.

:class:`PooledHTTPServer` replaces ``ThreadingHTTPServer`` (one new OS thread per connection, no cap,
listen backlog 5, a per-read timeout that a client trickling one header line at a time never trips).
A connection goes through three stages:

1. **accept** (the ``serve_forever`` thread), with a listen backlog of ``backlog`` (default 128, so a
   burst of connects is not dropped by the kernel, whose SYN retry comes only after ~1 s);
2. **read-ahead** (one thread, ``selectors``): the request line, headers and a ``Content-Length`` body
   of at most ``max_body_bytes`` are buffered without a thread per connection, for at most
   ``max_connections`` connections at once; the whole request must arrive within ``request_timeout``
   seconds of the accept, else ``408``. A slow client (slowloris) so costs a socket, never a worker;
3. **work**: a fixed pool of ``workers`` threads takes complete requests from a queue of at most
   ``queue_size`` and answers them (:class:`DeadlineRequestHandler`); writing the answer has the
   ``request_timeout`` limit too, so a client that never reads frees its worker.

Beyond ``max_connections`` reading or a full queue the client gets ``503`` at once (non-blocking
send, ``Retry-After: 1``). A request that does not fit the read-ahead memory (``READ_AHEAD_BYTES``
in all) goes to a worker as far as it has arrived, and the worker reads the rest under the same
deadline. ``server_close`` is graceful: connections still reading get ``503``, complete requests
(queued or in flight) are answered, then the threads are joined.

An answered or refused connection is half-closed and what the client sent is drained before the
close, so that unread bytes do not turn the close into a reset that could destroy the answer;
refused connections linger (at most ``MAX_LINGERING`` of them, ``LINGER_S`` each) for the same reason.
"""

from __future__ import annotations

import collections
import io
import json
import queue
import re
import selectors
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Deque, Dict, List, Optional, Tuple

DEFAULT_WORKERS = 8
DEFAULT_QUEUE_SIZE = 64
DEFAULT_BACKLOG = 128
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_MAX_BODY_BYTES = 4 << 20
READ_AHEAD_BYTES = 64 << 20  # buffered by the read-ahead stage, all connections together
MAX_HEAD_BYTES = 64 << 10  # request line + headers; a longer head goes to a worker, which refuses it
LINGER_S = 1.0
MAX_LINGERING = 256
DRAIN_BYTES = 1 << 20
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d{1,18})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


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


def request_end(data: bytes, max_body_bytes: int) -> Optional[int]:
    """Where the request in ``data`` ends (head + ``Content-Length`` body), None while the head is
    incomplete. A head without a usable length (no body, chunked, over ``max_body_bytes``) ends the
    request: the handler answers or refuses it without its body."""
    ends = [index + len(mark) for mark in (b"\r\n\r\n", b"\n\n") for index in [data.find(mark)] if index >= 0]
    if not ends:
        return None
    head_end = min(ends)
    head = data[:head_end]
    match = _CONTENT_LENGTH.search(head)
    if match is None or b"transfer-encoding" in head.lower() or int(match.group(1)) > max_body_bytes:
        return head_end
    return head_end + int(match.group(1))


class _Pending:
    """A connection in the read-ahead stage."""

    __slots__ = ("connection", "address", "data", "deadline", "end")

    def __init__(self, connection: socket.socket, address: Any, deadline: float) -> None:
        self.connection = connection
        self.address = address
        self.data = bytearray()
        self.deadline = deadline
        self.end: Optional[int] = None  # where the request ends, once its head is in


class _ReadAhead:
    """The read-ahead stage: one thread, one selector, every connection until its request is whole."""

    def __init__(self, server: "PooledHTTPServer") -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.inbox: Deque[_Pending] = collections.deque()
        self.pending: Dict[int, _Pending] = {}
        self.count = 0  # connections in this stage (inbox + pending), under server._lock
        self.buffered = 0  # bytes held in pending.data, this thread only
        self.stopping = False
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.wake_write.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, name="recsys-kd-serve-reader", daemon=True)

    def add(self, connection: socket.socket, address: Any) -> bool:
        """From the accepting thread: False when the stage is full."""
        with self.server._lock:
            if self.count >= self.server.max_connections:
                return False
            self.count += 1
        connection.setblocking(False)
        self.inbox.append(_Pending(connection, address, time.monotonic() + self.server.request_timeout))
        self._wake()
        return True

    def stop(self) -> None:
        self.stopping = True
        self._wake()
        self.thread.join()

    def _wake(self) -> None:
        try:
            self.wake_write.send(b"x")
        except OSError:  # the wake-up pipe is full: the thread is awake anyway
            pass

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._turn()
            except Exception:  # a bug here must not leave every later connection unanswered
                traceback.print_exc()
        closing = refusal(503, "Service Unavailable", "server shutting down; retry later")
        for item in [*self.pending.values(), *self.inbox]:
            self.server.refuse(item.connection, closing, linger=False)
        self.selector.close()
        self.wake_read.close()
        self.wake_write.close()

    def _turn(self) -> None:
        """Takes in new connections, reads what arrived, and refuses the requests past their deadline."""
        while self.inbox:
            item = self.inbox.popleft()
            self.pending[item.connection.fileno()] = item
            self.selector.register(item.connection, selectors.EVENT_READ, item)
        now = time.monotonic()
        wait = min([item.deadline for item in self.pending.values()], default=now + 0.5) - now
        for key, _ in self.selector.select(max(0.0, min(wait, 0.5))):
            if key.data is None:
                _drain(self.wake_read)
            else:
                self._read(key.data)
        now = time.monotonic()
        for item in [item for item in self.pending.values() if item.deadline <= now]:
            self._leave(item)
            self.server.log(f"{item.address[0]}: request timed out after {self.server.request_timeout:g} s "
                            f"({len(item.data)} bytes received)")
            self.server.refuse(item.connection, self.server.late_answer)

    def _read(self, item: _Pending) -> None:
        try:
            chunk = item.connection.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed (or half-closed) its side: the handler answers what came
            self._leave(item)
            if item.data:
                self.server.dispatch(item.connection, item.address, bytes(item.data), item.deadline)
            else:
                item.connection.close()
            return
        item.data += chunk
        self.buffered += len(chunk)
        if item.end is None:
            item.end = request_end(bytes(item.data[:MAX_HEAD_BYTES]), self.server.max_body_bytes)
            if item.end is None and len(item.data) >= MAX_HEAD_BYTES:
                item.end = len(item.data)  # a head this long is the handler's to refuse
        if (item.end is not None and len(item.data) >= item.end) or self.buffered > READ_AHEAD_BYTES:
            self._leave(item)  # whole, or too big to buffer here: the worker reads the rest
            self.server.dispatch(item.connection, item.address, bytes(item.data), item.deadline)

    def _leave(self, item: _Pending) -> None:
        self.selector.unregister(item.connection)
        del self.pending[item.connection.fileno()]
        self.buffered -= len(item.data)
        with self.server._lock:
            self.count -= 1


class PooledHTTPServer(HTTPServer):
    """
    An ``HTTPServer`` with a read-ahead stage and a fixed pool of workers (see the module doc).

    Args:
        address: ``(host, port)``; port 0 picks a free one.
        handler: the request handler class (a :class:`DeadlineRequestHandler`).
        workers: handler threads; at most this many requests are answered at once.
        queue_size: complete requests waiting for a worker; one more gets ``503``.
        backlog: the listen backlog (connections the kernel holds before they are accepted).
        max_connections: connections whose request is still arriving; one more gets ``503``.
        request_timeout: seconds from the accept for the whole request (line, headers, body) to
            arrive (``408`` past it), and for its answer to be taken.
        max_body_bytes: the largest body read ahead (a larger one is the handler's to refuse).
        quiet: no log lines on stderr.
    """

    def __init__(self, address: Tuple[str, int], handler: type, workers: int = DEFAULT_WORKERS,
                 queue_size: int = DEFAULT_QUEUE_SIZE, backlog: int = DEFAULT_BACKLOG,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, quiet: bool = False) -> None:
        if min(workers, queue_size, backlog, max_connections, max_body_bytes) < 1 or not request_timeout > 0:
            raise ValueError("workers, queue_size, backlog, max_connections and max_body_bytes must be >= 1 and "
                             "request_timeout > 0")
        self.workers = workers
        self.queue_size = queue_size
        self.request_queue_size = backlog  # socketserver's name for the listen backlog
        self.max_connections = max_connections
        self.request_timeout = float(request_timeout)
        self.max_body_bytes = max_body_bytes
        self.quiet = quiet
        self.busy_answer = refusal(503, "Service Unavailable", f"server busy: all {workers} workers and the "
                                   f"queue of {queue_size} requests are taken; retry later")
        self.crowded_answer = refusal(503, "Service Unavailable", f"server busy: {max_connections} connections "
                                      "are already sending their requests; retry later")
        self.late_answer = refusal(408, "Request Timeout", f"the whole request (line, headers, body) must arrive "
                                   f"within {request_timeout:g} s")
        self._work_queue: "queue.Queue[Optional[Tuple[socket.socket, Any, bytes, float]]]" = queue.Queue(queue_size)
        self._lingering: Deque[Tuple[float, socket.socket]] = collections.deque()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self._threads: List[threading.Thread] = []  # server_close runs inside a failed bind
        self._reader: Optional[_ReadAhead] = None
        super().__init__(address, handler)  # binds and listens; raises OSError before any thread starts
        self._reader = _ReadAhead(self)
        self._reader.thread.start()
        self._threads = [threading.Thread(target=self._work, name=f"recsys-kd-serve-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """On the accepting thread: on to the read-ahead stage, or refused at once when it is full."""
        if not self._reader.add(request, client_address):
            self.refuse(request, self.crowded_answer)

    def dispatch(self, request: socket.socket, client_address: Any, data: bytes, deadline: float) -> None:
        """From the read-ahead stage: a request (whole, or as far as it fits) to the workers' queue."""
        try:
            self._work_queue.put_nowait((request, client_address, data, deadline))
        except queue.Full:
            self.refuse(request, self.busy_answer)

    def read_ahead(self) -> Tuple[bytes, float]:
        """In a handler: its request's bytes read so far and its deadline (``time.monotonic``)."""
        return self._local.data, self._local.deadline

    def _work(self) -> None:
        while True:
            item = self._work_queue.get()
            if item is None:
                return
            request, client_address, self._local.data, self._local.deadline = item
            try:
                request.settimeout(self.request_timeout)
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
            request.send(answer)  # the send buffer of a connection not yet answered takes a small answer
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

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or stalls is one log line, not a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"{client_address[0]}: connection dropped: {type(error).__name__}: {error}")
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        """Stops listening; connections still sending their request get ``503``; complete requests,
        queued or in flight, are answered; then the threads are joined. Call after ``shutdown()``
        (or before ``serve_forever``)."""
        super().server_close()
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.stop()
        for _ in self._threads:
            self._work_queue.put(None)
        for thread in self._threads:
            thread.join()
        with self._lock:
            while self._lingering:
                self._lingering.popleft()[1].close()


class _DeadlineReader(io.RawIOBase):
    """A request's bytes: those read ahead, then the socket's, each ``recv`` waiting at most until the
    deadline (then ``TimeoutError``)."""

    def __init__(self, connection: socket.socket, data: bytes, deadline: float, seconds: float) -> None:
        super().__init__()
        self.connection = connection
        self.data = memoryview(data)
        self.deadline = deadline
        self.seconds = seconds
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.data:
            size = min(len(buffer), len(self.data))
            buffer[:size] = self.data[:size]
            self.data = self.data[size:]
            return size
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
        finally:
            self.connection.settimeout(self.seconds)  # for writing the answer


class DeadlineRequestHandler(BaseHTTPRequestHandler):
    """
    A request handler for :class:`PooledHTTPServer`: one request per connection (HTTP/1.0, so no idle
    keep-alive connection holds a worker), read from the bytes read ahead and then, if the request did
    not fit there, from the socket under the same deadline; a request that misses it gets ``408``
    (``send_error``). ``self.answered`` tells whether an answer was started.
    """

    server: PooledHTTPServer
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file: replaced by one under the deadline
        data, deadline = self.server.read_ahead()
        self.reader = _DeadlineReader(self.connection, data, deadline, self.server.request_timeout)
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
        super().send_response(code, message)
