"""The ``serve`` stage: an HTTP JSON endpoint over a serving artifact, on the standard library alone.

Loads only the artifact (:func:`~recsys_kd.export.artifact.load_artifact`, torch only: TorchScript or
compiled ``.pt2``) and answers on
``host:port`` (default ``127.0.0.1:8080``) with a :class:`~recsys_kd.export.http_pool.PooledHTTPServer`:
a listen backlog of ``backlog``; one read-ahead thread that buffers up to ``max_connections`` requests
as they arrive, each within ``request_timeout`` seconds of its accept (``408`` past it), so that a slow
client holds no worker; a fixed pool of ``workers`` threads that answer complete requests from a queue
of at most ``queue_size`` (``503`` at once beyond either bound). The workers parse and check requests;
the model runs on one thread that batches concurrent requests (:class:`~recsys_kd.export.batching.MicroBatcher`:
while other requests are being read, a batch waits for them at most ``batch_wait_ms``, up to
``max_batch_rows`` rows), so that many small requests approach the artifact's batched rate.

``POST /predict`` with ``Content-Type: application/json`` (or none) and a body of at most
``max_body_bytes``::

    {"instances": [{"I1": 0.69, ..., "C1": 1234, ..., "tags": [3, 17]}, ...]}

- one object per example, at most ``max_instances``; every feature of the artifact's schema by name
  (``GET /health`` lists them), nothing else;
- a dense feature (``schema.dense``) is a finite JSON number, already transformed as the dataset was
  (``dense_transform``, e.g. ``log1p(max(v, 0))`` for Criteo integers), inside ``dense_range``: the
  transform's own range when it has one (``DENSE_RANGES``: ``[0, 44]`` for ``log1p(max(v, 0))`` of an
  int64 count), else ``[-max_dense_abs, max_dense_abs]`` (default 1e9; a value far outside the
  training data overflows the model's float32 arithmetic); when the model ignores dense features
  (``dense_used: false``) they may be left out;
- a sparse feature is its **id** as in the prepared dataset (an integer in ``[0, num_embeddings)``;
  0 = missing, 1 = out of vocabulary), or for a multi-hot feature a list of such ids (may be empty).
  Raw values are not accepted: map them with the dataset's id rule (``recsys-kd score`` does it for
  raw log files).

Answer ``200 {"model": name, "probabilities": [p_0, ...]}`` in instance order; every answer is valid
JSON (no ``NaN``): an instance whose probability still comes out non-finite gets ``422`` naming it.

Errors are JSON ``{"error": message, "instance": i, "field": name}`` (the last two when they apply),
never a crash: 400 malformed JSON, a wrong structure, a missing / unknown field, a wrong type, a
non-finite number, a dense value outside ``dense_range``, an id out of range; 404 unknown path; 405
wrong method; 408 the request did not arrive within ``request_timeout``; 411 no Content-Length; 413 body
over ``max_body_bytes`` or more than ``max_instances`` instances (the body is not read); 415 a non-JSON
content type; 422 a non-finite model output; 503 every worker busy and the queue full, or
``max_connections`` still sending their requests (``Retry-After: 1``).

``GET /health`` answers ``200`` with the model's metadata: name, parameters, FLOPs per example,
storage dtype, the compression log (AFM/SVD steps, when any), source checkpoint, test metrics, the
feature order and per-feature contract, and the server's limits.

Shutdown is graceful: SIGINT / SIGTERM stop accepting connections, complete requests (queued or in
flight) are answered, connections still sending their request get ``503``, then the process exits.

Example::

    server = make_server("runs/demo/artifacts/dagfm_outer.pt", port=0)   # 0: a free port
    threading.Thread(target=server.serve_forever).start()
    ... POST http://127.0.0.1:{server.server_port}/predict ...
    server.shutdown(); server.server_close()
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from recsys_kd.export.artifact import load_artifact, unweighted_contract
from recsys_kd.export.batching import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_WAIT_MS, MicroBatcher
from recsys_kd.export.http_pool import (DEFAULT_BACKLOG, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
                                        DEFAULT_QUEUE_SIZE, DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_WORKERS,
                                        DeadlineRequestHandler, PooledHTTPServer)

DEFAULT_PORT = 8080
DEFAULT_MAX_INSTANCES = 4096
DEFAULT_MAX_DENSE_ABS = 1e9
# a dense value's range after a dataset's dense transform, by the transform's name in the schema
DENSE_RANGES: Dict[str, Tuple[float, float]] = {"log1p(max(v, 0))": (0.0, 44.0)}  # log1p(2**63) = 43.67


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and where (instance index, field)."""

    def __init__(self, status: int, message: str, instance: Optional[int] = None, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.instance = instance
        self.field = field

    def body(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"error": self.message}
        if self.instance is not None:
            body["instance"] = self.instance
        if self.field is not None:
            body["field"] = self.field
        return body


class Predictor:
    """
    The artifact and its input contract: JSON instances -> validated tensors -> probabilities.

    Args:
        module (torch.jit.ScriptModule): the loaded artifact.
        metadata (Dict[str, Any]): its ``{"schema": ..., "model": ...}`` (from ``load_artifact``).
        max_instances (int): the most instances one request may hold.
        max_dense_abs (float): the bound on |dense value| when the dense transform has no range of its
            own (``DENSE_RANGES``).
        batcher (Optional[MicroBatcher]): runs the model calls, batched with other requests'; None:
            each call runs on the caller's thread.

    Example::

        predictor = Predictor(*load_artifact(path))
        predictor.predict({"instances": [{"C1": 5, ...}]})  # [0.031...]
    """

    def __init__(self, module: Any, metadata: Dict[str, Any], max_instances: int = DEFAULT_MAX_INSTANCES,
                 max_dense_abs: float = DEFAULT_MAX_DENSE_ABS, batcher: Optional[MicroBatcher] = None) -> None:
        self.module = module
        self.batcher = batcher
        self.metadata = metadata
        self.max_instances = max_instances
        contract = unweighted_contract(metadata)  # JSON instances carry ids only: a weighted model is refused
        self.dense: List[str] = list(contract["dense"]["columns"])
        self.dense_used: bool = bool(contract["dense"]["used"])
        self.dense_transform = contract["dense"].get("transform") or "none"
        self.dense_range = DENSE_RANGES.get(self.dense_transform, (-max_dense_abs, max_dense_abs))
        self.dense_range_source = (f"the range of the dense transform {self.dense_transform}"
                                   if self.dense_transform in DENSE_RANGES else "the server's bound (--max-dense-abs)")
        self.sparse: List[Tuple[str, int, bool]] = [
            (f["name"], int(f["num_embeddings"]), bool(f["multi_hot"])) for f in contract["sparse_features"]
        ]
        self.any_multi_hot = any(multi_hot for _, _, multi_hot in self.sparse)
        self.known = set(self.dense) | {name for name, _, _ in self.sparse}

    def predict(self, payload: Any, arrival: Any = None) -> List[float]:
        """Probabilities [B] of a parsed request body; raises :class:`RequestError` for a bad one.
        ``arrival``: the request's announcement to the batcher (:meth:`MicroBatcher.arriving`)."""
        dense, ids, offsets = self.tensors(payload)
        if self.batcher is not None:
            probabilities = self.batcher.run(dense, ids, offsets, arrival)
        else:
            with torch.no_grad():
                probabilities = self.module(dense, ids, offsets)
        finite = torch.isfinite(probabilities)
        if not bool(finite.all()):  # inputs in range can still overflow a model's float32 arithmetic
            index = int((~finite).nonzero()[0, 0])
            raise RequestError(422, f"instance {index}: the model's probability is {probabilities[index].item()}, "
                               "not a number: its dense values overflow the model; send values like the training "
                               "data's", instance=index)
        return probabilities.tolist()

    def tensors(self, payload: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dense [B, n_dense]``, ``ids [N]``, ``offsets [B * F + 1]`` (example-major) of a request body."""
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object {{\"instances\": [...]}}, got {_kind(payload)}")
        unknown = sorted(set(payload) - {"instances"})
        if unknown:
            raise RequestError(400, f"unknown top-level keys {unknown}; the body is {{\"instances\": [...]}}")
        instances = payload.get("instances")
        if not isinstance(instances, list):
            raise RequestError(400, f"'instances' must be a list of objects, got {_kind(instances)}", field="instances")
        if not instances:
            raise RequestError(400, "'instances' is empty; send at least one instance", field="instances")
        if len(instances) > self.max_instances:
            raise RequestError(413, f"{len(instances)} instances, more than the limit of {self.max_instances} per request")
        dense_rows: List[List[float]] = []
        ids: List[int] = []
        lengths: List[int] = []
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise RequestError(400, f"instance {index} must be an object of feature: value, got {_kind(instance)}",
                                   instance=index)
            extra = sorted(set(instance) - self.known)
            if extra:
                raise RequestError(400, f"instance {index}: unknown feature {extra[0]!r} (features: GET /health)",
                                   instance=index, field=extra[0])
            dense_rows.append([self._dense_value(instance, index, name) for name in self.dense])
            for name, limit, multi_hot in self.sparse:
                bag = self._sparse_ids(instance, index, name, limit, multi_hot)
                ids.extend(bag)
                lengths.append(len(bag))
        size = len(instances)
        dense = torch.tensor(dense_rows, dtype=torch.float32).reshape(size, len(self.dense))
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
        return dense, torch.tensor(ids, dtype=torch.int64), offsets

    def _dense_value(self, instance: Dict[str, Any], index: int, name: str) -> float:
        if name not in instance:
            if not self.dense_used:  # the model ignores dense features: any value would do
                return 0.0
            raise RequestError(400, f"instance {index}: missing dense feature {name!r}", instance=index, field=name)
        value = instance[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, f"instance {index}: dense feature {name!r} must be a number, got {_kind(value)}",
                               instance=index, field=name)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        low, high = self.dense_range
        if math.isfinite(number) and not low <= number <= high:
            raise RequestError(400, f"instance {index}: dense feature {name!r} is {_short(value)}, outside "
                               f"[{low:g}, {high:g}], {self.dense_range_source}", instance=index, field=name)
        if not math.isfinite(number) or abs(number) > 3.4e38:
            raise RequestError(400, f"instance {index}: dense feature {name!r} is {_short(value)}, not a finite "
                               "float32", instance=index, field=name)
        return number

    @staticmethod
    def _sparse_ids(instance: Dict[str, Any], index: int, name: str, limit: int, multi_hot: bool) -> List[int]:
        if name not in instance:
            raise RequestError(400, f"instance {index}: missing sparse feature {name!r} (send id 0 for a missing value)",
                               instance=index, field=name)
        value = instance[name]
        if multi_hot:
            if not isinstance(value, list):
                raise RequestError(400, f"instance {index}: multi-hot feature {name!r} must be a list of ids, got "
                                   f"{_kind(value)}", instance=index, field=name)
            bag = value
        else:
            if isinstance(value, list):
                raise RequestError(400, f"instance {index}: feature {name!r} takes one id, got a list",
                                   instance=index, field=name)
            bag = [value]
        for item in bag:
            if isinstance(item, bool) or not isinstance(item, int):
                raise RequestError(400, f"instance {index}: feature {name!r} ids must be integers, got {_kind(item)}",
                                   instance=index, field=name)
            if not 0 <= item < limit:
                raise RequestError(
                    400, f"instance {index}: feature {name!r} has id {item}, outside [0, {limit}) (num_embeddings; "
                    "0 = missing, 1 = out of vocabulary)", instance=index, field=name)
        return bag

    def health(self) -> Dict[str, Any]:
        """The model's metadata for ``GET /health``."""
        model = self.metadata["model"]
        contract = model["input"]
        return {
            "status": "ok",
            "model": model["model"],
            "parameters": model["parameters"],
            "flops_per_example": model["flops_per_example"],
            "storage_dtype": model["storage_dtype"],
            "compression": _finite(model.get("compression", [])),
            "source": model["source"],
            "metrics": _finite(model.get("metrics")),
            "created": model.get("created"),
            "libraries": model.get("libraries"),
            "field_order": contract["field_order"],
            "features": {
                "dense": self.dense,
                "dense_used": self.dense_used,
                "dense_transform": contract["dense"].get("transform"),
                "dense_range": list(self.dense_range),
                "sparse": contract["sparse_features"],
                "reserved_ids": contract["reserved_ids"],
            },
            "max_instances": self.max_instances,
        }


def _kind(value: Any) -> str:
    """A JSON value's type, as a client would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _short(value: Any) -> str:
    """A number as a message quotes it (a 400-digit integer cut short)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _finite(value: Any) -> Any:
    """A JSON value with its non-finite floats (a NaN metric) as null, so that it stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class ModelServer(PooledHTTPServer):
    """A pooled HTTP server holding a :class:`Predictor`; ``options`` are :class:`PooledHTTPServer`'s
    (workers, queue_size, backlog, max_connections, request_timeout). ``server_close`` is graceful:
    complete requests are answered, then the threads are joined."""

    def __init__(self, address: Tuple[str, int], predictor: Predictor, max_body_bytes: int, quiet: bool = False,
                 **options: Any) -> None:
        self.predictor = predictor
        self.started = time.time()
        super().__init__(address, _Handler, max_body_bytes=max_body_bytes, quiet=quiet, **options)

    def limits(self) -> Dict[str, Any]:
        batcher = self.predictor.batcher
        return {"max_body_bytes": self.max_body_bytes, "workers": self.workers, "queue_size": self.queue_size,
                "backlog": self.request_queue_size, "max_connections": self.max_connections,
                "request_timeout_s": self.request_timeout, "batching": batcher.stats() if batcher else None}

    def server_close(self) -> None:
        """As :class:`PooledHTTPServer`'s (complete requests are answered), then the model thread stops."""
        super().server_close()
        if self.predictor.batcher is not None:
            self.predictor.batcher.close()


class _Handler(DeadlineRequestHandler):
    server: ModelServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] == "/health":
            self._send(200, {**self.server.predictor.health(), "uptime_s": round(time.time() - self.server.started, 1),
                             **self.server.limits()})
        elif self.path.split("?", 1)[0] == "/predict":
            self._send(405, {"error": "use POST for /predict"}, allow="POST")
        else:
            self._send(404, {"error": f"no such path {self.path!r}; use POST /predict or GET /health"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/predict":
            if self.path.split("?", 1)[0] == "/health":
                self._send(405, {"error": "use GET for /health"}, allow="GET")
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use POST /predict or GET /health"})
            return
        batcher = self.server.predictor.batcher
        try:
            with batcher.arriving() if batcher is not None else contextlib.nullcontext() as arrival:
                payload = self._read_json()
                probabilities = self.server.predictor.predict(payload, arrival)
        except RequestError as error:
            self._send(error.status, error.body())
            return
        except Exception as error:  # a bug, not the client's fault: say so without crashing the server
            self._send(500, {"error": f"internal error: {type(error).__name__}: {error}"})
            return
        self._send(200, {"model": self.server.predictor.metadata["model"]["model"], "probabilities": probabilities})

    def _method_not_allowed(self) -> None:
        self._send(405, {"error": f"method {self.command} not allowed; use POST /predict or GET /health"},
                   allow="GET, POST")

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _read_json(self) -> Any:
        content_type = self.headers.get("Content-Type", "application/json").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(415, f"Content-Type must be application/json, got {content_type!r}")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            raise RequestError(411, "a Content-Length header is required (no chunked bodies)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise RequestError(400, f"Content-Length {self.headers['Content-Length']!r} is not an integer") from None
        if length < 0:
            raise RequestError(400, f"Content-Length {length} is negative")
        if length > self.server.max_body_bytes:  # refused unread
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes} bytes")
        try:
            body = self.rfile.read(length)
        except TimeoutError as error:
            raise RequestError(408, f"{error} (line, headers and body)") from None
        if len(body) != length:
            raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as error:
            raise RequestError(400, f"body is not UTF-8: {error}") from None
        except (ValueError, RecursionError) as error:
            raise RequestError(400, f"malformed JSON: {error}") from None

    def _send(self, status: int, body: Dict[str, Any], allow: Optional[str] = None) -> None:
        try:
            text = json.dumps(body, allow_nan=False)  # bare NaN / Infinity is not JSON
        except ValueError as error:
            status, text = 500, json.dumps({"error": f"internal error: the answer is not valid JSON: {error}"})
        data = (text + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (bad request line, unsupported method, ...) as JSON too."""
        self.close_connection = True
        text = f"{code} {message or HTTPStatus(code).phrase}" + (f": {explain}" if explain else "")
        self._send(code, {"error": text})

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(
    artifact: Union[str, Path],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    threads: int = 1,
    quiet: bool = False,
    workers: int = DEFAULT_WORKERS,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    backlog: int = DEFAULT_BACKLOG,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_dense_abs: float = DEFAULT_MAX_DENSE_ABS,
    verify: bool = True,
    batch_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
) -> ModelServer:
    """
    Loads the artifact and binds the server (not yet serving: call ``serve_forever``).

    Args:
        artifact: the serving artifact.
        host: address to bind; ``127.0.0.1`` keeps it on this machine.
        port: TCP port; 0 picks a free one (``server.server_port``).
        max_body_bytes: larger bodies get 413 before they are read.
        max_instances: more instances in one request get 413.
        threads: torch intra-op threads (process-wide); up to ``workers`` requests run at once.
        quiet: no access log on stderr.
        workers: handler threads (a fixed pool).
        queue_size: complete requests waiting for a worker; beyond them a request gets 503 at once.
        backlog: the listen backlog.
        max_connections: connections still sending their request (read ahead without a worker); beyond
            them a connection gets 503 at once.
        request_timeout: seconds from the accept for a whole request (line, headers, body) to arrive;
            408 past it.
        max_dense_abs: the bound on |dense value| when the dense transform has no range of its own.
        verify: check the artifact against the checksum in its export record first.
        batch_wait_ms: the longest a model call waits for requests being read to join it.
        max_batch_rows: the most rows of one model call (a larger request runs alone).
    """
    if min(max_body_bytes, max_instances, threads, workers, queue_size, backlog, max_connections) < 1:
        raise ValueError("max_body_bytes, max_instances, threads, workers, queue_size, backlog and max_connections "
                         "must be >= 1")
    if not (request_timeout > 0 and max_dense_abs > 0) or batch_wait_ms < 0 or max_batch_rows < 1:
        raise ValueError("request_timeout and max_dense_abs must be > 0, batch_wait_ms >= 0, max_batch_rows >= 1")
    torch.set_num_threads(threads)
    module, metadata = load_artifact(artifact, verify=verify)
    batcher = MicroBatcher(module, max_batch_rows, batch_wait_ms / 1000)
    return ModelServer((host, port), Predictor(module, metadata, max_instances, max_dense_abs, batcher), max_body_bytes,
                       quiet=quiet, workers=workers, queue_size=queue_size, backlog=backlog,
                       max_connections=max_connections, request_timeout=request_timeout)


def serve(artifact: Union[str, Path], **options: Any) -> None:
    """Runs :func:`make_server` until SIGINT or SIGTERM, then shuts down gracefully."""
    server = make_server(artifact, **options)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            # shutdown() waits for serve_forever to return: call it off the main thread that runs it
            threading.Thread(target=server.shutdown, name="recsys-kd-serve-stop").start()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    host, port = server.server_address[:2]
    health = server.predictor.health()
    max_batch, wait = server.predictor.batcher.max_rows, server.predictor.batcher.max_wait_s * 1000
    print(f"serving {health['model']} ({artifact}) on http://{host}:{port}: POST /predict, GET /health; "
          f"{server.workers} workers, queue {server.queue_size}, {server.max_connections} connections, request "
          f"deadline {server.request_timeout:g} s; batches of <= {max_batch} rows, wait <= {wait:g} ms; "
          "Ctrl-C or SIGTERM stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()  # joins the workers: in-flight requests are answered
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("server stopped", flush=True)
