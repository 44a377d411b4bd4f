"""Training throughput (samples/s) of the sharded trainer, per model, on synthetic Criteo-shaped data.

26 sparse features with 100k-row tables (D = 16), 13 dense features (projected), batch 4096 per
process. Each model trains ``--steps`` steps after ``--warmup`` untimed ones, through the same code
as ``recsys-kd train`` (DMP, fused Adagrad for the tables, Adam for the rest, the trainer's steps).
One process, then 2 processes (gloo, table-wise), on the same machine; per count of processes, each
``--pipelines`` entry (``train.pipeline``: torchrec's TrainPipelineSparseDist, or ``none``, one step
after the other) in turn, ``--repeats`` times, so that a loaded machine slows both alike.

    .venv/bin/python tools/bench_train.py [--models dnn dcn ...] [--steps 20] [--processes 1 2]
        [--pipelines sparse_dist none] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["dnn", "dcn", "dcnv2", "xdeepfm", "autoint_plus", "dagfm_outer"]


def prepare_data(workdir: Path, rows: int) -> Path:
    from recsys_kd.data.prepare import PrepareConfig, prepare
    from recsys_kd.data.schema import Schema
    from recsys_kd.data.synthetic import SyntheticConfig

    dataset = workdir / "data"
    wanted = SyntheticConfig(rows=rows, seed=0, min_vocab=99_998, max_vocab=99_998)
    if (dataset / "schema.json").exists() and Schema.load(dataset).splits["train"].rows > 0:
        return dataset
    prepare(PrepareConfig(format="synthetic", synthetic=wanted, output=str(dataset), overwrite=True, progress=False,
                          row_group_rows=16384))
    return dataset


def measure(model_name: str, dataset: Path, steps: int, warmup: int, batch: int, pipeline: str) -> dict:
    """Runs in every rank; returns this rank's timing."""
    import torch
    import torch.distributed as dist

    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import Schema
    from recsys_kd.distributed import init_distributed
    from recsys_kd.models.zoo import ModelConfig, build_model
    from recsys_kd.train.config import TrainConfig
    from recsys_kd.train.sharding import ShardingConfig
    from recsys_kd.train.steps import epoch_batches, make_steps
    from recsys_kd.train.task import LabelTask
    from recsys_kd.train.trainer import distribute
    from recsys_kd.warnings_filter import silence_third_party_warnings

    silence_third_party_warnings()
    ctx = init_distributed("gloo")
    config = TrainConfig(model=ModelConfig(name=model_name), sharding=ShardingConfig(type="table_wise"),
                         deterministic_init=False)
    torch.manual_seed(0)
    model = build_model(Schema.load(dataset), config.model)
    dmp, optimizer, _ = distribute(LabelTask(model), config, ctx)

    trainer_steps = make_steps(pipeline, dmp, optimizer, ctx.device)
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=batch, shuffle=True), ctx.rank, ctx.world_size)
    batches = epoch_batches(reader, warmup + steps, ctx.world_size, pin=ctx.device.type == "cuda")
    for _ in range(warmup):
        trainer_steps.progress(batches)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        trainer_steps.progress(batches)
    dist.barrier()
    seconds = time.perf_counter() - started
    return {"model": model_name, "world_size": ctx.world_size, "threads": torch.get_num_threads(), "pipeline": pipeline,
            "samples_per_second": steps * batch * ctx.world_size / seconds,
            "flops_per_example": model.flops_per_example()}


def run(model_name: str, processes: int, pipeline: str, args) -> dict:
    port = _free_port()
    children = []
    threads = max(1, (os.cpu_count() or 1) // processes)
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, __file__, "--child", model_name, "--workdir", str(args.workdir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--pipelines", pipeline]
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError(f"{model_name} x{processes} ({pipeline}) failed")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pipelines", nargs="+", choices=["sparse_dist", "none"], default=["sparse_dist", "none"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_train"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.workdir / "data", args.steps, args.warmup, args.batch,
                                 args.pipelines[0])))
        return
    prepare_data(args.workdir, args.rows)
    print(f"# bench_train  {time.strftime('%Y-%m-%d')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"batch {args.batch}/process  26 sparse x 100k rows x D16 + 13 dense  table-wise, fused Adagrad + Adam")
    print(f"{'model':14s} {'processes':>9s} {'threads/proc':>12s} {'pipeline':>11s} {'samples/s':>12s} "
          f"{'MFLOP/example':>14s}")
    for model_name in args.models:
        for processes in args.processes:
            for _ in range(args.repeats):
                for pipeline in args.pipelines:
                    result = run(model_name, processes, pipeline, args)
                    print(f"{model_name:14s} {processes:>9d} {result['threads']:>12d} {pipeline:>11s} "
                          f"{result['samples_per_second']:>12,.0f} {result['flops_per_example'] / 1e6:>14.3f}", flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
