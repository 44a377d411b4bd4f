"""Runs library calls on 2 gloo ranks in spawned processes: many calls in one launch, and a child
imports only the called module (not the test module), which is most of a launch's cost.

Example::

    outcomes = call_on_ranks("recsys_kd.data.prepare:prepare", {"a": {"config": config_a}}, tmp_path)
    outcomes["a"] == ["ok", "ok"]   # per rank: "ok" or "<ErrorType>: <message>"
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def call_on_ranks(function: str, calls: Dict[str, Dict[str, Any]], root: Path, world_size: int = 2) -> Dict[str, List[str]]:
    """``module:function(**kwargs)`` for each named call in turn, on every rank of one process group;
    returns each call's outcome per rank."""
    root.mkdir(parents=True, exist_ok=True)
    # spawn, not fork: earlier tests leave threads whose locks a forked child can inherit held
    mp.start_processes(_as_rank, args=(world_size, root, function, calls), nprocs=world_size, start_method="spawn")
    return {name: [(root / f"outcome-{name}-{rank}").read_text() for rank in range(world_size)] for name in calls}


def _as_rank(rank: int, world_size: int, root: Path, function: str, calls: Dict[str, Dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    module, name = function.split(":")
    target = getattr(importlib.import_module(module), name)
    dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=rank, world_size=world_size)
    try:
        for call, kwargs in calls.items():
            try:
                target(**kwargs)
                outcome = "ok"
            except Exception as error:  # recorded for the test to compare with 1 process
                outcome = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            (root / f"outcome-{call}-{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()
