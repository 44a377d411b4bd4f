"""``prepare`` on 1 and N processes: rows/s of the Criteo converter over one synthetic Criteo-format file.

Writes the file once (26 categorical + 13 integer fields, ``--rows`` lines), then for each world size
and id rule runs ``recsys-kd prepare`` on that many local processes, as torchrun does (RANK,
WORLD_SIZE, MASTER_ADDR/PORT; one OMP thread each), and prints the wall time of the whole job
(process start included), the rows/s of the stage's own record and each rank's rows and seconds. The
machine's load average is printed before and after: on a shared machine the figures are only as good
as the idle cores.

    .venv/bin/python tools/bench_prepare_ranks.py [--rows 1000000] [--ranks 1 2] [--rules hash vocab]
        [--workdir runs/bench_prepare_ranks]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(config: Path, world_size: int) -> float:
    """``recsys-kd prepare`` on ``world_size`` local processes; returns the job's wall seconds."""
    port = free_port()
    started = time.perf_counter()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        if world_size == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        processes.append(subprocess.Popen([sys.executable, "-m", "recsys_kd.cli", "prepare", "--config", str(config)],
                                          env=env, stdout=subprocess.DEVNULL))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"prepare on {world_size} processes failed: exit codes {codes}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rules", nargs="+", choices=["hash", "vocab"], default=["hash", "vocab"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_prepare_ranks"))
    args = parser.parse_args()
    from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv

    args.workdir.mkdir(parents=True, exist_ok=True)
    raw = args.workdir / f"criteo_{args.rows}.txt"
    if not raw.exists():
        write_criteo_tsv(SyntheticConfig(rows=args.rows, seed=0, max_vocab=100_000), raw, progress=False)
    print(f"input: {raw} ({args.rows:,} rows, {raw.stat().st_size / 2**20:.0f} MiB); "
          f"{os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.1f}")
    print(f"{'rule':5} {'ranks':>5} {'wall s':>7} {'job rows/s':>11} {'record rows/s':>14}  per rank (rows, s)")
    for rule in args.rules:
        for world_size in args.ranks:
            output = args.workdir / f"data_{rule}_{world_size}"
            config = args.workdir / f"prepare_{rule}.yaml"
            config.write_text(yaml.safe_dump({"prepare": {
                "format": "criteo", "inputs": [str(raw)], "output": str(output), "overwrite": True, "progress": False,
                "ids": {"rule": rule, "num_embeddings": 100_000, "min_count": 2}, "split": {"method": "random"},
            }}))
            wall = run(config, world_size)
            record = json.loads((output / "prepare.json").read_text())
            rows = sum(record["rows"].values())
            ranks = ", ".join(f"({r['rows']:,}, {r['seconds']:.1f})" for r in record["ranks"])
            print(f"{rule:5} {world_size:5d} {wall:7.1f} {rows / wall:11,.0f} {record['rows_per_second']:14,.0f}  {ranks}")
            shutil.rmtree(output)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
