"""Micro-batching for the HTTP server: concurrent requests share one model call.

A serving artifact answers a batch of 4096 rows at a far higher rate per row than 4096 calls of one
row (the per-call overhead and the per-op overhead dominate a small call). :class:`MicroBatcher` runs
every model call of the server on one thread: a request's tensors join a queue, and the thread takes
the first waiting request and then, for at most ``max_wait_s``, the requests that arrive, up to
``max_rows`` rows, concatenates them (example-major bags concatenate as they come: the offsets of each
request are shifted by the ids before it), calls the model once and hands each request its rows.

The wait is bounded and only happens when it can pay: the handlers announce a request as soon as they
start reading it (:meth:`MicroBatcher.arriving`), and the thread waits only while an announced request
has not yet joined the queue. A lone client is so never delayed; many clients fill a batch.

Example::

    batcher = MicroBatcher(module, max_rows=4096, max_wait_s=0.002)
    with batcher.arriving() as arrival:
        dense, ids, offsets = ...                               # parse and check the request
        probabilities = batcher.run(dense, ids, offsets, arrival)
    batcher.close()
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Deque, Iterator, List, Optional

import torch

DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_BATCH_ROWS = 4096


class _Arrival:
    """A request announced to the batcher; ``queued`` once its tensors joined the queue."""

    def __init__(self) -> None:
        self.queued = False


class _Job:
    def __init__(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> None:
        self.dense, self.ids, self.offsets = dense, ids, offsets
        self.rows = int(dense.size(0))
        self.done = threading.Event()
        self.result: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None


class MicroBatcher:
    """
    One thread that runs the model on the concatenated requests of a short window (see the module doc).

    Args:
        module: the artifact, ``module(dense, ids, offsets) -> probabilities [B]``.
        max_rows (int): the most rows of one call (a request larger than this runs alone).
        max_wait_s (float): the longest a batch waits for announced requests after its first one.
    """

    def __init__(self, module: Any, max_rows: int = DEFAULT_MAX_BATCH_ROWS,
                 max_wait_s: float = DEFAULT_MAX_WAIT_MS / 1000) -> None:
        if max_rows < 1 or max_wait_s < 0:
            raise ValueError(f"max_rows must be >= 1 and max_wait_s >= 0, got {max_rows}, {max_wait_s}")
        self.module = module
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.calls = 0  # model calls made, and the requests and rows they answered (for /health)
        self.requests = 0
        self.rows = 0
        self.model_seconds = 0.0  # time inside the model calls: the rest of a request's time is HTTP and JSON
        self._condition = threading.Condition()
        self._jobs: Deque[_Job] = collections.deque()
        self._arriving = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="recsys-kd-serve-model", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[_Arrival]:
        """Announces a request from the moment its handler starts reading it until it joins the queue
        (:meth:`run`) or fails before."""
        arrival = _Arrival()
        with self._condition:
            self._arriving += 1
        try:
            yield arrival
        finally:
            if not arrival.queued:
                with self._condition:
                    self._arriving -= 1
                    self._condition.notify_all()

    def run(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
            arrival: Optional[_Arrival] = None) -> torch.Tensor:
        """Probabilities [B] of one request's checked tensors, computed in a batch with others."""
        job = _Job(dense, ids, offsets)
        with self._condition:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._jobs.append(job)
            if arrival is not None and not arrival.queued:
                arrival.queued = True
                self._arriving -= 1
            self._condition.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Answers the queued requests, then stops the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()

    def stats(self) -> dict:
        return {"calls": self.calls, "requests": self.requests, "rows": self.rows,
                "model_seconds": round(self.model_seconds, 6), "max_rows": self.max_rows,
                "max_wait_ms": self.max_wait_s * 1000}

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._call(batch)

    def _take(self) -> Optional[List[_Job]]:
        """The next batch: the first queued request, then those that join within the wait."""
        with self._condition:
            while not self._jobs:
                if self._closed:
                    return None
                self._condition.wait()
            batch = [self._jobs.popleft()]
            rows = batch[0].rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_rows:
                if self._jobs:
                    if rows + self._jobs[0].rows > self.max_rows:
                        break
                    batch.append(self._jobs.popleft())
                    rows += batch[-1].rows
                    continue
                remaining = deadline - time.monotonic()
                if self._arriving == 0 or remaining <= 0 or self._closed:
                    break
                self._condition.wait(remaining)
            return batch

    def _call(self, batch: List[_Job]) -> None:
        try:
            if len(batch) == 1:
                job = batch[0]
                dense, ids, offsets = job.dense, job.ids, job.offsets
            else:
                dense = torch.cat([job.dense for job in batch])
                ids = torch.cat([job.ids for job in batch])
                shifted, base = [], 0
                for job in batch:
                    shifted.append(job.offsets[:-1] + base)
                    base += int(job.ids.numel())
                shifted.append(torch.tensor([base], dtype=torch.int64))
                offsets = torch.cat(shifted)
            started = time.perf_counter()
            with torch.no_grad():
                probabilities = self.module(dense, ids, offsets)
            self.model_seconds += time.perf_counter() - started
            start = 0
            for job in batch:
                job.result = probabilities[start: start + job.rows]
                start += job.rows
        except BaseException as error:  # handed to every request of the batch; the thread lives on
            for job in batch:
                job.error = error
        finally:
            self.calls += 1
            self.requests += len(batch)
            self.rows += sum(job.rows for job in batch)
            for job in batch:
                job.done.set()
