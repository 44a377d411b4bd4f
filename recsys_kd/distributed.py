"""Process-group setup shared by every stage, and the one home of every collective the project calls:
the same code on 1..N processes, CPU (gloo) or GPU (NCCL).

Under torchrun / torchx ``dist.ddp`` the environment names rank, world size and rendezvous; a plain
``recsys-kd train`` gets a one-process group on a free local port so the sharded code path
(DistributedModelParallel, collectives) is the same everywhere.

**Collective device.** NCCL reduces CUDA tensors only, gloo CPU ones. Every collective here moves its
tensors to :func:`collective_device` (the current CUDA device under NCCL, the CPU under gloo) and
copies results back into the caller's tensors, so callers pass tensors wherever they live (CPU
metrics, CUDA shards). The group stays plain ``nccl`` rather than ``"cpu:gloo,cuda:nccl"``: one
backend, one set of connections, and every byte over NVLink / InfiniBand instead of a silent TCP
path for CPU tensors (prediction gathers and Gram matrices are large). Other modules never call
``torch.distributed`` collectives themselves (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", timeout_seconds: int = 1800) -> DistributedContext:
    """Joins (or creates) the default process group; returns this process's context.

    ``backend``: ``auto`` (NCCL when CUDA is available, else gloo), ``gloo`` or ``nccl``.
    """
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    chosen = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, and no GPU is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(chosen, timeout=timeout)
        else:
            dist.init_process_group(
                chosen, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
            )
    else:
        chosen = dist.get_backend()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, chosen)


def device_for_backend(backend: str, cuda_index: Optional[int]) -> torch.device:
    """The device a collective's tensors must be on for process-group ``backend``: ``cuda:<cuda_index>``
    (the current CUDA device) for NCCL, the CPU for gloo (and for a one-process run without a group)."""
    if backend == "nccl":
        if cuda_index is None:
            raise RuntimeError("the NCCL backend needs a current CUDA device, and none is set")
        return torch.device("cuda", cuda_index)
    return torch.device("cpu")


def collective_device() -> torch.device:
    """:func:`device_for_backend` of the default process group (the CPU without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = dist.get_backend()
    return device_for_backend(backend, torch.cuda.current_device() if backend == "nccl" else None)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Optional[Any] = None) -> torch.Tensor:
    """Collective, in place: ``tensor`` becomes the element-wise ``op`` (sum, max, min) over the ranks of
    ``group`` (default: all); any device. Returns ``tensor``."""
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=reduce_op, group=group)
    return _copy_back(tensor, moved)


def reduce_to(tensor: torch.Tensor, dst: int) -> torch.Tensor:
    """Collective, in place on rank ``dst``: the sum over ranks of ``tensor`` (other ranks' ``tensor``
    is left unspecified). Returns ``tensor``."""
    moved = tensor.to(collective_device())
    dist.reduce(moved, dst=dst)
    return _copy_back(tensor, moved)


def broadcast_from(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Collective, in place: rank ``src``'s ``tensor`` on every rank. Returns ``tensor``."""
    moved = tensor.to(collective_device())
    dist.broadcast(moved, src=src)
    return _copy_back(tensor, moved)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's ``local`` ``[n_r, ...]`` (same trailing shape and dtype, any ``n_r``)
    concatenated in rank order ``[sum n_r, ...]``, on ``local``'s device, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local.clone()
    device = collective_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(size.item()) for size in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]).to(local.device)


def barrier() -> None:
    """Collective: waits for every rank (under NCCL on the current CUDA device, which NCCL's barrier
    otherwise has to guess)."""
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def launched_context(backend: str = "auto") -> DistributedContext:
    """The process group of a launched job, joined when not yet (torchrun / torchx set WORLD_SIZE > 1),
    or the group already there; a plain one-process run gets rank 0 of 1 without creating a group.

    For stages that need no group on one process (``prepare``, ``score``): they stay as cheap as
    before when run alone, and take their share of the work under torchrun.
    """
    if (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(backend)
    return DistributedContext(0, 1, 0, torch.device("cpu"), "none")


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops too instead of waiting for it in a collective."""


T = TypeVar("T")


def gather_outcome(work: Callable[[], T]) -> List[T]:
    """Runs ``work`` on this rank, then gathers every rank's JSON-able result, in rank order
    (collective: every rank calls it, with its own ``work``). When any rank's ``work`` raised, every
    rank raises: that rank its own error, the others :class:`PeerFailed` naming the first failed rank
    and its one-line message. So a failure on one rank never leaves the others waiting in a later
    collective, and every rank agrees on the verdict.

    Example::

        staging = gather_outcome(lambda: str(make_staging()) if rank == 0 else None)[0]
    """
    try:
        value, failure = work(), None
    except Exception as error:  # shared with the other ranks, then re-raised here
        value, failure = None, error
    message = None if failure is None else f"{type(failure).__name__}: {' '.join(str(failure).split())}"
    outcomes = all_gather_json({"value": value, "error": message})
    if failure is not None:
        raise failure
    failed = [(rank, outcome["error"]) for rank, outcome in enumerate(outcomes) if outcome["error"] is not None]
    if failed:
        rank, error = failed[0]
        raise PeerFailed(f"rank {rank} failed: {error}")
    return [outcome["value"] for outcome in outcomes]


def from_rank(rank: int, work: Callable[[], T]) -> T:
    """Runs ``work`` on rank ``rank`` alone and returns its JSON-able result on every rank
    (collective, with :func:`gather_outcome`'s verdict: when it raised, every rank raises)."""
    here = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return gather_outcome(work if here == rank else lambda: None)[rank]


def sum_arrays_over_ranks(arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Elementwise sums over the ranks of numeric arrays (collective); the arrays themselves without a
    process group. int64 arrays are summed exactly; float64 ones in the backend's order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [np.array(a) for a in arrays]
    return [all_reduce(torch.from_numpy(np.array(array))).numpy() for array in arrays]


def max_over_ranks(value: int) -> int:
    return int(all_reduce(torch.tensor([value], dtype=torch.int64), op="max").item())


def sum_over_ranks(value: int) -> int:
    return int(all_reduce(torch.tensor([value], dtype=torch.int64)).item())


def _copy_back(tensor: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_gather_json(value: Any) -> List[Any]:
    """Every rank's JSON-able ``value``, in rank order, on every rank (collective: every rank calls
    it). Sent as UTF-8 JSON in tensors, never pickled (other objects, e.g. paths, as their ``str``, as
    records are written); ``[value]`` as JSON would read it back without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [json.loads(json.dumps(value, default=str))]
    encoded = torch.frombuffer(bytearray(json.dumps(value, default=str).encode("utf-8")), dtype=torch.uint8)
    sizes = all_gather_rows(torch.tensor([encoded.numel()], dtype=torch.int64)).tolist()
    gathered = all_gather_rows(encoded).numpy().tobytes()
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [json.loads(gathered[start : start + size].decode("utf-8")) for start, size in zip(starts, sizes)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
