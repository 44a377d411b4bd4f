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
from typing import Any, List

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
    it). Sent as UTF-8 JSON in tensors, never pickled; ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [json.loads(json.dumps(value))]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    encoded = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
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
