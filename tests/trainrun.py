"""Runs ``recsys-kd train`` on N local processes the way torchrun does (RANK, WORLD_SIZE, ...)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from recsys_kd.models.zoo import ModelConfig, build_model
from recsys_kd.data.schema import Schema
from recsys_kd.runs import TrainOutput
from recsys_kd.train import checkpoint
from recsys_kd.train.task import LabelTask


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_recipe(path: Path, recipe: Dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_ranks(config: Path, world_size: int, overrides: List[str] = (), fault: Optional[str] = None,
              timeout: float = 240) -> List[int]:
    """``recsys-kd train`` on ``world_size`` processes; the exit codes in rank order."""
    return run_stage("train", config, world_size, overrides, fault, timeout)


def run_stage(stage: str, config: Path, world_size: int, overrides: List[str] = (),
              fault: Optional[str] = None, timeout: float = 240) -> List[int]:
    """Starts one process per rank; when any rank dies, the others are killed (as torchrun does).
    ``fault``: ``point=rank:index`` kills that rank there (tests/faults/__main__.py). Returns the exit codes in
    rank order."""
    port = free_port()
    entry = ["tests.faults", fault] if fault else ["recsys_kd.cli"]
    command = [sys.executable, "-m", *entry, stage, "--config", str(config), *overrides]
    processes = [subprocess.Popen(command, env=_rank_env(rank, world_size, port), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for rank in range(world_size)]
    codes = _wait(processes, timeout)
    if any(codes) and not fault:
        for rank, p in enumerate(processes):
            print(f"--- rank {rank} exit {p.returncode}\n" + p.stdout.read().decode(errors="replace")[-4000:])
    return codes


def run_train_jobs(jobs: Path, world_size: int, timeout: float = 240) -> List[int]:
    """``python -m tests.train_jobs JOBS`` (several train runs, some stopped) on ``world_size``
    processes, each writing its output to ``JOBS.rank<r>.log`` (a pipe nobody reads during many runs
    could fill up); the exit codes in rank order."""
    port = free_port()
    logs = [Path(jobs).with_suffix(f".rank{rank}.log") for rank in range(world_size)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "wb") as output:
            processes.append(subprocess.Popen([sys.executable, "-m", "tests.train_jobs", str(jobs)],
                                              env=_rank_env(rank, world_size, port), stdout=output, stderr=subprocess.STDOUT))
    codes = _wait(processes, timeout)
    if any(codes):
        for rank, log in enumerate(logs):
            print(f"--- rank {rank} exit {codes[rank]}\n" + log.read_text(errors="replace")[-4000:])
    return codes


def _rank_env(rank: int, world_size: int, port: int) -> Dict[str, str]:
    """The environment torchrun gives rank ``rank``, one intra-op thread each."""
    return {
        **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        # tests.* is importable wherever pytest was started from
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }


def _wait(processes: List[subprocess.Popen], timeout: float) -> List[int]:
    """Waits for every process; when one fails (or the time is up), kills the others, as torchrun does."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes) or time.time() > deadline:
            for p in processes:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    return [p.returncode for p in processes]


def train_on_synthetic(root: Path, models: Dict[str, Dict], rows: int, seed: int, max_steps: int) -> Path:
    """A small synthetic dataset (``root/data``: 5 sparse and 2 dense features, parts of 3 row groups)
    and one single-process training run per model (``root/<name>``); returns ``root``."""
    from recsys_kd.data.prepare import PrepareConfig, prepare
    from recsys_kd.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(rows=rows, seed=seed, sparse_features=5, dense_features=2, max_vocab=300, chunk_rows=1000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=300, rows_per_part=900))
    for name, model in models.items():
        config = write_recipe(root / f"train_{name}.yaml", {
            "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
            "reader": {"batch_size": 256, "shuffle": True},
            "train": {"model": model, "output": str(root / name), "epochs": 1, "max_steps": max_steps, "progress": False},
        })
        assert run_ranks(config, 1) == [0], name
    return root


def final_weights(output: Path, dataset: Path, model: Dict) -> Dict[str, torch.Tensor]:
    """The newest checkpoint's model tensors as a plain state_dict (single process, no group)."""
    module = LabelTask(build_model(Schema.load(dataset), ModelConfig(**model)))
    latest = TrainOutput(output).latest()
    return checkpoint.load_model_tensors(latest, module.state_dict())
