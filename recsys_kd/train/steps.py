"""How the trainer runs its steps: one after the other, or overlapped by torchrec's train pipeline.

Both take the host batches of an epoch as an iterator and run one optimizer step per
:meth:`progress` call: zero_grad (which also hands the fused tables their learning rate, so a rate
set before the call is the one this step uses), the task module's forward on the batch (its loss
times the batch's weight: 0 for a padding batch), backward, optimizer step. Each returns a
:class:`StepResult`: the loss, detached and still on the device (reading it is a host sync), and the
batch it trained, whose reader position the trainer saves.

- :class:`SynchronousSteps` (``train.pipeline: none``): takes the next batch, copies it to the
  device, trains on it.
- :class:`PipelinedSteps` (``train.pipeline: sparse_dist``): torchrec's ``TrainPipelineSparseDist``.
  It holds up to three batches: while batch i trains, batch i+1's input distribution (the id
  all-to-all of the sharded tables) runs, and batch i+2 is copied to the device. On CUDA the copy
  and the input distribution run on side streams, from pinned host memory, overlapping the compute;
  on CPU the same calls run in order, and every step computes exactly what the synchronous one does.

:func:`epoch_batches` is what both take: a rank's host batches of an epoch, padding batches once its
rows run out, pinned when training on CUDA. The pipeline pulls batches ahead of the step it trains,
so the reader's own position runs ahead of training: :class:`TrainedPosition` keeps the position of
the last batch trained, which is what a checkpoint must save for a resumed run to read every row
exactly once.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.fx.proxy import TraceError
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from recsys_kd.config import ConfigError
from recsys_kd.data.batch import Batch, padding_batch
from recsys_kd.data.reader import ParquetReader


class StepResult(NamedTuple):
    """What one step hands back: ``loss`` (scalar, detached, on the device) and the ``batch`` it
    trained (on the device)."""

    loss: torch.Tensor
    batch: Batch


def weighted_forward(dmp: nn.Module) -> Callable[[Batch], Tuple[torch.Tensor, StepResult]]:
    """The step's forward: ``batch -> (loss * weight, StepResult)``, the weight 0 for a padding batch
    (it keeps a rank's collectives matched and trains nothing) and 1 otherwise."""

    def forward(batch: Batch) -> Tuple[torch.Tensor, StepResult]:
        loss, _ = dmp(batch)
        weight = 0.0 if batch.is_padding else 1.0
        return loss * weight, StepResult(loss.detach(), batch)

    return forward


class SynchronousSteps:
    """Each step in order: the next host batch, its copy to the device, forward, backward, update.

    Example::

        steps = SynchronousSteps(dmp, optimizer, torch.device("cpu"))
        loss, batch = steps.progress(batches)
    """

    def __init__(self, dmp: nn.Module, optimizer: Any, device: torch.device) -> None:
        self._forward = weighted_forward(dmp)
        self._optimizer = optimizer
        self._device = device

    def progress(self, batches: Iterator[Batch]) -> StepResult:
        """One step on the next batch of ``batches``; raises StopIteration when there is none."""
        batch = next(batches)
        # zero_grad first, as the pipeline does: it also hands the fused tables' kernel its learning rate,
        # which the forward captures for the backward's in-place update (set after the forward, a changed
        # rate would reach the tables one step late, and the first step after a resume would use the
        # configured one)
        self._optimizer.zero_grad()
        weighted, result = self._forward(batch.to(self._device, non_blocking=True))
        weighted.backward()
        self._optimizer.step()
        return result

    def pause(self) -> None:
        """Nothing is in flight between two synchronous steps."""

    def pipelined_modules(self) -> List[str]:
        """No table lookup is pipelined."""
        return []


class PipelinedSteps:
    """Steps through torchrec's ``TrainPipelineSparseDist`` (copy, input distribution and compute
    of three consecutive batches overlapped; see the module docstring).

    The pipeline replaces the sharded tables' forward while it runs, so anything else that calls the
    model (evaluation, the final test) needs :meth:`pause` first. Pausing drops the pipeline; the
    next :meth:`progress` starts a new one, which first takes again the host batches the old one had
    pulled and not trained, so no batch is lost or trained twice. Given another iterator (a new
    epoch), it starts over from that one.

    Example::

        steps = PipelinedSteps(dmp, optimizer, torch.device("cuda", 0))
        loss, batch = steps.progress(batches)  # batch i trains while i+1 is distributed, i+2 copied
        steps.pause()
        evaluate(dmp, ...)
    """

    def __init__(self, dmp: nn.Module, optimizer: Any, device: torch.device) -> None:
        self._dmp = dmp
        self._optimizer = optimizer
        self._device = device
        self._pipeline: Optional[TrainPipelineSparseDist] = None
        self._source: Optional[Iterator[Batch]] = None
        self._feed: Optional[Iterator[Batch]] = None
        self._pulled: Deque[Batch] = collections.deque()  # host batches the pipeline holds, oldest first

    def progress(self, batches: Iterator[Batch]) -> StepResult:
        """One step on the oldest batch not trained yet; raises StopIteration when there is none."""
        if batches is not self._source:
            self.pause()
            self._pulled.clear()  # another epoch's stream: what the old one held is not part of it
            self._source = batches
        if self._pipeline is None:
            held, self._pulled = list(self._pulled), collections.deque()
            self._feed = self._pull(itertools.chain(held, batches))
            self._pipeline = TrainPipelineSparseDist(self._dmp, self._optimizer, self._device,
                                                     custom_model_fwd=weighted_forward(self._dmp))
        try:
            result = self._pipeline.progress(self._feed)
        except TraceError as error:
            raise ConfigError(f"train.pipeline sparse_dist: torchrec cannot trace this task module to find its "
                              f"table lookups ({error}); set train.pipeline=none") from None
        self._pulled.popleft()
        return result

    def pause(self) -> None:
        """Gives the model its own forward back; the batches in flight are taken again on resuming."""
        if self._pipeline is not None:
            self._pipeline.detach()
            self._pipeline = None

    def pipelined_modules(self) -> List[str]:
        """The sharded modules whose input distribution the pipeline has run ahead (those it found
        called on an attribute of the batch when it traced the task module)."""
        task = self._dmp.module  # DistributedModelParallel's task module, without its DDP wrapper
        return sorted(name for name, module in task.named_modules() if getattr(module, "is_pipelined", False))

    def _pull(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            self._pulled.append(batch)
            yield batch


Steps = Union[SynchronousSteps, PipelinedSteps]


def resolved_pipeline(pipeline: str, device: torch.device) -> str:
    """``train.pipeline`` on ``device``: ``auto`` is ``sparse_dist`` on CUDA, where the pipeline's side
    streams overlap copies and id all-to-alls with the compute, and ``none`` elsewhere (on CPU the
    pipeline makes the same calls in the same order, so it only adds its tracing)."""
    if pipeline == "auto":
        return "sparse_dist" if device.type == "cuda" else "none"
    return pipeline


def make_steps(pipeline: str, dmp: nn.Module, optimizer: Any, device: torch.device) -> Steps:
    """The steps of ``train.pipeline`` on ``device``: ``sparse_dist`` (:class:`PipelinedSteps`) or
    ``none`` (:class:`SynchronousSteps`); ``auto`` as :func:`resolved_pipeline` says."""
    kind = PipelinedSteps if resolved_pipeline(pipeline, device) == "sparse_dist" else SynchronousSteps
    return kind(dmp, optimizer, device)


def epoch_batches(reader: ParquetReader, count: int, world_size: int, pin: bool = False) -> Iterator[Batch]:
    """The ``count`` host batches a rank trains on in its epoch (its rest after a resume): the
    reader's, then padding batches (trained with weight 0) once its rows run out, so that every rank
    takes as many steps. On 2 or more ranks each is padded to the full batch size (equal batches on
    every rank). ``pin``: in page-locked memory (training on CUDA), so that the copy to the device
    runs asynchronously."""
    size = reader.config.batch_size
    source = iter(reader)
    for _ in range(count):
        batch = next(source, None)
        if batch is None:
            batch = padding_batch(reader.schema, size, reader.config.extras, reader.vector_widths)
        elif world_size > 1:
            batch = batch.padded_to(size)
        yield batch.pin_memory() if pin else batch


class TrainedPosition:
    """A reader's position after the last batch trained, when batches are pulled ahead of training.

    Made before the epoch's ``iter(reader)``: the position starts where that pass starts (a loaded
    position, or the epoch's beginning), and moves with each trained batch's worker position.
    :meth:`state_dict` is the reader's state at that position, what a checkpoint saves.

    Example::

        position = TrainedPosition(reader)
        for batch in reader: ...; position.trained(batch)
        checkpoint["reader"] = position.state_dict()
    """

    def __init__(self, reader: ParquetReader) -> None:
        self._reader = reader
        self._rows_consumed: List[int] = list(reader.state_dict()["rows_consumed"])

    def trained(self, batch: Batch) -> None:
        """Records that ``batch`` was trained on (a padding batch holds no reader position)."""
        if not batch.is_padding:
            self._rows_consumed[batch.worker] = batch.rows_consumed

    def state_dict(self) -> Dict[str, Any]:
        return {**self._reader.state_dict(), "rows_consumed": list(self._rows_consumed)}
