"""recsys_kd.distributed's collectives: the device their tensors go to per backend, and their results
on 2 gloo processes compared with a direct computation."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardMetadata

from recsys_kd.compress.sharded import shard_placement
from recsys_kd.distributed import (
    all_gather_json,
    all_gather_rows,
    all_reduce,
    barrier,
    broadcast_from,
    collective_device,
    device_for_backend,
    max_over_ranks,
    reduce_to,
)


def test_nccl_collectives_run_on_the_current_cuda_device_gloo_on_the_cpu():
    assert device_for_backend("nccl", 3) == torch.device("cuda", 3)
    assert device_for_backend("gloo", None) == torch.device("cpu")
    assert device_for_backend("gloo", 2) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="current CUDA device"):
        device_for_backend("nccl", None)


def test_without_a_group_collectives_would_run_on_the_cpu():
    if not dist.is_initialized():
        assert collective_device() == torch.device("cpu")


def test_shard_placements_name_the_shards_device():
    assert shard_placement(1, torch.device("cuda", 3)) == "rank:1/cuda:3"
    assert shard_placement(0, torch.device("cpu")) == "rank:0/cpu"
    meta = ShardMetadata([0, 0], [4, 2], shard_placement(1, torch.device("cuda", 3)))
    assert meta.placement.rank() == 1 and meta.placement.device() == torch.device("cuda", 3)


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {}
        out["sum"] = all_reduce(torch.tensor([1.5, rank], dtype=torch.float64)).tolist()
        out["max"] = max_over_ranks(10 * rank + 3)
        out["rows"] = all_gather_rows(torch.full((rank + 1, 2), float(rank))).tolist()
        out["json"] = all_gather_json({"rank": rank, "text": "é" * rank})
        reduced = reduce_to(torch.tensor([rank + 1.0]), dst=1)
        out["reduced"] = reduced.tolist() if rank == 1 else None
        out["broadcast"] = broadcast_from(torch.tensor([rank * 7.0]), src=1).tolist()
        barrier()
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_processes_match_a_direct_computation():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2)
    for rank in range(2):
        out = results[rank]
        assert out["sum"] == [3.0, 1.0]
        assert out["max"] == 13
        assert out["rows"] == [[0.0, 0.0]] + [[1.0, 1.0]] * 2  # rank 0's one row, rank 1's two
        assert out["json"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "é"}]
        assert out["broadcast"] == [7.0]
    assert results[1]["reduced"] == [3.0]
