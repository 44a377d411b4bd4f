"""recsys_kd.distributed's collectives: the device their tensors go to per backend, and their results
on 2 gloo processes compared with a direct computation."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def test_without_a_group_or_under_gloo_collectives_run_on_the_cpu():
    assert collective_device() == torch.device("cpu")  # no GPU here: no group, or a gloo one


def _worker(rank: int, init_file: Path, out_dir: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
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
        Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_processes_match_a_direct_computation(tmp_path):
    # spawn, not fork: threads earlier tests leave behind can hold locks a forked child inherits
    mp.start_processes(_worker, args=(tmp_path / "pg", tmp_path), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):
        out = results[rank]
        assert out["sum"] == [3.0, 1.0]
        assert out["max"] == 13
        assert out["rows"] == [[0.0, 0.0]] + [[1.0, 1.0]] * 2  # rank 0's one row, rank 1's two
        assert out["json"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "é"}]
        assert out["broadcast"] == [7.0]
    assert results[1]["reduced"] == [3.0]
