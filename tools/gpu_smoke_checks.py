"""The Python halves of tools/gpu_smoke.sh's CUDA checks; each exits 0 on success and prints one line.

    python tools/gpu_smoke_checks.py tbe cuda       # FBGEMM's fused TBE kernel on the GPU vs torch's EmbeddingBag
    python tools/gpu_smoke_checks.py tbe cpu        # the same check on FBGEMM's CPU kernel
    torchrun --nproc_per_node N tools/gpu_smoke_checks.py collectives   # every collective of recsys_kd.distributed under NCCL
    python tools/gpu_smoke_checks.py utilisation SECONDS OUT            # samples nvidia-smi's GPU utilisation
    python tools/gpu_smoke_checks.py resumed TRAIN_JSON STEPS           # a resumed run finished its steps
    python tools/gpu_smoke_checks.py speed TRAIN_JSON UTILISATION_JSON  # samples/s and utilisation, one line
    python tools/gpu_smoke_checks.py compressed COMPRESS_JSON           # both chains ran, AUCs on one line
    python tools/gpu_smoke_checks.py pipeline PIPELINED SYNCHRONOUS DATA  # train.pipeline sparse_dist vs none
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch


def tbe(device: str) -> None:
    """A fused table-batched embedding bag (rowwise Adagrad in the backward) on ``device`` against a
    plain EmbeddingBag with the same weights: forward equal, one step moves exactly the rows looked up."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, OptimType, SplitTableBatchedEmbeddingBagsCodegen)

    rows, dim, batch = 1000, 64, 512
    location, compute = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda"
                         else (EmbeddingLocation.HOST, ComputeDevice.CPU))
    tbe_module = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, location, compute)], optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1,
    )
    with torch.no_grad():
        tbe_module.split_embedding_weights()[0].copy_(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)))
    weights = tbe_module.split_embedding_weights()[0].detach().clone()
    ids = torch.randint(0, rows, (batch,), device=device)
    offsets = torch.arange(0, batch + 1, device=device)
    pooled = tbe_module(ids, offsets)
    reference = torch.nn.functional.embedding_bag(ids, weights, offsets[:-1], mode="sum")
    torch.testing.assert_close(pooled, reference)
    pooled.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    after = tbe_module.split_embedding_weights()[0]
    touched = torch.zeros(rows, dtype=torch.bool, device=device)
    touched[ids] = True
    assert (after[touched] != weights[touched]).any(dim=1).all(), "the fused optimizer missed looked-up rows"
    assert torch.equal(after[~touched], weights[~touched]), "rows that were not looked up changed"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"fused TBE on {where}: forward matches EmbeddingBag, rowwise Adagrad updated the {int(touched.sum())} "
          f"rows looked up and no other")


def collectives() -> None:
    """Every collective recsys_kd.distributed offers, under NCCL, against the values they must give."""
    from recsys_kd import distributed

    ctx = distributed.init_distributed("nccl")
    world, rank = ctx.world_size, ctx.rank
    assert distributed.max_over_ranks(rank) == world - 1
    assert distributed.sum_over_ranks(rank + 1) == world * (world + 1) // 2
    assert distributed.all_gather_json({"rank": rank}) == [{"rank": r} for r in range(world)]
    torch.distributed.barrier()
    if ctx.is_main:
        print(f"NCCL collectives on {world} ranks: max_over_ranks, sum_over_ranks, all_gather_json agree")
    torch.distributed.destroy_process_group()


def utilisation(seconds: float, output: str) -> None:
    """Samples nvidia-smi's utilization.gpu every 0.5 s for ``seconds``; writes {mean, max, samples}."""
    samples = []
    end = time.time() + seconds
    while time.time() < end:
        query = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
        if query.returncode == 0 and query.stdout.strip():
            samples.append(float(query.stdout.split()[0]))
        time.sleep(0.5)
    result = {"mean": sum(samples) / len(samples) if samples else 0.0, "max": max(samples, default=0.0),
              "samples": len(samples)}
    with open(output, "w") as sink:
        json.dump(result, sink)


def resumed(record_path: str, steps: int) -> None:
    with open(record_path) as source:
        record = json.load(source)
    assert record["steps"] == steps, f"{record['steps']} steps, expected {steps}"
    print(f"killed after a checkpoint, resumed, {steps} steps on {record['world_size']} rank(s) ({record['backend']}), "
          f"test auc {record['test']['auc']:.4f}")


def compressed(record_path: str) -> None:
    with open(record_path) as source:
        record = json.load(source)
    assert sorted(record["chains"]) == ["afm", "svd"], sorted(record["chains"])
    final = {method: chain[-1] for method, chain in record["chains"].items()}
    print(f"{record['world_size']} rank(s): " + ", ".join(
        f"{method} {row['stage']} test auc {row['test_auc']:.4f} ({row['parameters']:,} params)"
        for method, row in final.items()))


def pipeline(pipelined: str, synchronous: str, dataset: str) -> None:
    """Two train outputs of the same run, with torchrec's TrainPipelineSparseDist (batch i+1's copy and
    input distribution on side streams while batch i trains) and one step after the other: it found the
    table lookups, ends at the same validation history and weights (CUDA kernels may sum in another
    order: within float tolerance), and the epoch's host batches are pinned; their samples/s."""
    from pathlib import Path

    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.runs import TrainOutput
    from recsys_kd.train.checkpoint import load_model
    from recsys_kd.train.steps import epoch_batches

    records = {}
    for name, path in (("sparse_dist", pipelined), ("none", synchronous)):
        with open(Path(path) / "train.json") as source:
            records[name] = json.load(source)
        assert records[name]["train_pipeline"]["kind"] == name, records[name]["train_pipeline"]
    assert records["sparse_dist"]["train_pipeline"]["pipelined_modules"], "the pipeline found no table lookup"
    a, b = records["sparse_dist"], records["none"]
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] and a["steps"] == b["steps"]
    for x, y in zip(a["history"], b["history"]):
        for metric in ("auc", "logloss"):
            assert abs(x["valid"][metric] - y["valid"][metric]) < 1e-4, (x["step"], metric, x["valid"], y["valid"])
    weights = [load_model(TrainOutput(Path(path)), TrainOutput(Path(path)).latest().name).state_dict()
               for path in (pipelined, synchronous)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-3, atol=1e-4, msg=key)
    reader = ParquetReader(Path(dataset), "train", ReaderConfig(batch_size=256), 0, 1)
    batch = next(epoch_batches(reader, 1, 1, pin=True))
    assert batch.dense.is_pinned() and batch.sparse.values().is_pinned() and batch.labels.is_pinned()
    print(f"train pipeline: {', '.join(a['train_pipeline']['pipelined_modules'])} pipelined, {a['steps']} steps equal "
          f"to the synchronous loop; {a['samples_per_second_this_run']:,.0f} vs "
          f"{b['samples_per_second_this_run']:,.0f} samples/s; host batches pinned")


def speed(record_path: str, utilisation_path: str) -> None:
    with open(record_path) as source:
        record = json.load(source)
    try:
        with open(utilisation_path) as source:
            used = json.load(source)
    except OSError:
        used = {"mean": float("nan"), "max": float("nan")}
    print(f"{record['samples_per_second_this_run']:,.0f} samples/s on {record['world_size']} GPU(s) "
          f"({record['backend']}), GPU utilisation mean {used['mean']:.0f}% max {used['max']:.0f}%")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "tbe":
        tbe(sys.argv[2])
    elif command == "collectives":
        collectives()
    elif command == "utilisation":
        utilisation(float(sys.argv[2]), sys.argv[3])
    elif command == "resumed":
        resumed(sys.argv[2], int(sys.argv[3]))
    elif command == "speed":
        speed(sys.argv[2], sys.argv[3])
    elif command == "compressed":
        compressed(sys.argv[2])
    elif command == "pipeline":
        pipeline(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown check {command!r} (tbe, collectives, utilisation, resumed, speed, compressed, pipeline)")
