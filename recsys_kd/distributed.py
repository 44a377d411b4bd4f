"""Process-group setup shared by every stage: the same code on 1..N processes, CPU (gloo) or GPU (NCCL).

Under torchrun / torchx ``dist.ddp`` the environment names rank, world size and rendezvous; a plain
``recsys-kd train`` gets a one-process group on a free local port so the sharded code path
(DistributedModelParallel, collectives) is the same everywhere.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, TypeVar

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
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = []
    for array in arrays:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        dist.all_reduce(tensor)
        summed.append(tensor.cpu().numpy())
    return summed


def max_over_ranks(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def sum_over_ranks(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor)
    return int(tensor.item())


def all_gather_json(value: Any) -> List[Any]:
    """Every rank's JSON-able ``value``, in rank order, on every rank (collective: every rank calls
    it). Sent as UTF-8 JSON in tensors, never pickled (other objects, e.g. paths, as their ``str``, as
    records are written); ``[value]`` as JSON would read it back without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [json.loads(json.dumps(value, default=str))]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    encoded = torch.frombuffer(bytearray(json.dumps(value, default=str).encode("utf-8")), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([encoded.numel()], dtype=torch.int64, device=device))
    largest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(largest, dtype=torch.uint8, device=device)
    padded[: encoded.numel()] = encoded.to(device)
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [json.loads(g[: int(n.item())].cpu().numpy().tobytes().decode("utf-8")) for g, n in zip(gathered, sizes)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
