"""Kill scenarios: a stage run on N processes, one rank SIGKILLed at a random point (through the hooks
of ``recsys_kd.train.hooks``, installed by ``python -m tests.faults``), then rerun; the rerun must end
where an uninterrupted run ends, with no row lost or duplicated and no partial file under a final name.

Shared by the default suite (``tests/faults/test_kills.py``: one kill per stage) and by
``tools/chaos.py`` (many kills per stage, over seeds).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq

from recsys_kd.data.parts import sidecar_path
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.runs import CHECKPOINTS, COMPRESS_RECORD, SCORE_RECORD, TRAIN_RECORD
from tests.trainrun import run_stage, write_recipe

TEACHER = {"name": "dcn", "embedding_dim": 8, "mlp_layers": [16]}
STUDENT = {"name": "dnn", "embedding_dim": 8, "mlp_layers": [8]}
STAGES = ("train", "distill", "compress", "infer", "score")


@dataclass
class Outcome:
    stage: str
    rank: int
    index: int
    killed: bool
    partial_files: List[str]
    same_result: bool
    rows_lost: int
    rows_duplicated: int


def make_workspace(root: Path, rows: int = 3000) -> Path:
    """A small synthetic dataset, a trained teacher (1 process), its soft labels, and its artifact."""
    root.mkdir(parents=True, exist_ok=True)
    synthetic = SyntheticConfig(rows=rows, seed=11, sparse_features=4, dense_features=2, max_vocab=200, chunk_rows=1000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=200, rows_per_part=400))
    assert run_stage("train", recipe(root, "teacher", "train"), 1) == [0]
    assert run_stage("infer", recipe(root, "soft_labels", "infer"), 1) == [0]
    from recsys_kd.export import export_artifact

    export_artifact(root / "teacher", root / "teacher.pt", parity_rows=256)
    return root


def recipe(root: Path, name: str, stage: str) -> Path:
    """Every stage's section, writing to ``root/<name>``."""
    output = str(root / name)
    sections = {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 128, "shuffle": True},
        "train": {"model": TEACHER, "output": output if stage == "train" else str(root / "teacher"), "epochs": 1,
                  "checkpoint_every_steps": 2, "progress": False, "sharding": {"type": "table_wise"}},
        "infer": {"teachers": [{"name": "dcn", "train_output": str(root / "teacher")}],
                  "output": output if stage == "infer" else str(root / "soft_labels"), "batch_size": 64,
                  "progress": False},
        "distill": {"model": STUDENT, "output": output, "epochs": 1, "checkpoint_every_steps": 2, "progress": False,
                    "sharding": {"type": "table_wise"},
                    "distill": {"teachers": ["dcn"], "soft_labels": str(root / "soft_labels"),
                                "loss": {"hard": 1.0, "mse": 1.0}}},
        "compress": {"source": str(root / "teacher"), "output": output, "methods": ["afm"], "batch_size": 500,
                     "sharding": {"type": "table_wise"},
                     "steps": [{"what": "mlp", "ranks": {"0": 4}}], "finetune": {"epochs": 1}, "progress": False},
    }
    return write_recipe(root / f"{name}.yaml", sections)


def kill_points(root: Path, stage: str) -> int:
    """How many kill points (steps or parts) one rank of a run of ``stage`` passes."""
    if stage == "score":
        return len(json.loads((root / "score_reference" / SCORE_RECORD).read_text())["parts"])
    if stage == "infer":
        from recsys_kd.data.schema import Schema

        files = sum(len(s.files) for s in Schema.load(root / "data").splits.values())
        return max(1, files // 2)
    reference = {"train": "train_reference", "distill": "distill_reference",
                 "compress": "compress_reference/afm/step1_mlp/ft"}[stage]
    return json.loads((root / reference / TRAIN_RECORD).read_text())["steps"]


def run(root: Path, stage: str, name: str, world_size: int, fault: str = "") -> List[int]:
    if stage == "score":
        return [_score(root, name, fault)]
    return run_stage(stage, recipe(root, name, stage), world_size, fault=fault or None)


def _score(root: Path, name: str, fault: str) -> int:
    import os
    import subprocess
    import sys

    entry = ["tests.faults", fault] if fault else ["recsys_kd.cli"]
    command = [sys.executable, "-m", *entry, "score", str(root / "teacher.pt"), str(root / "data"),
               str(root / name), "--split", "train", "--batch-size", "64", "--no-progress"]
    project = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([project, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True).returncode


def references(root: Path, world_size: int = 2) -> None:
    """The uninterrupted run of every stage, once."""
    for stage in STAGES:
        if not (root / f"{stage}_reference").exists():
            assert run(root, stage, f"{stage}_reference", world_size) == [0] * (1 if stage == "score" else world_size)


def kill_and_rerun(root: Path, stage: str, rng: random.Random, world_size: int = 2) -> Outcome:
    """One scenario: a random rank killed at a random point of ``stage``, then the same command again."""
    ranks = 1 if stage == "score" else world_size
    rank = rng.randrange(ranks)
    index = rng.randrange(1, max(2, kill_points(root, stage)))
    point = {"score": "score_part", "infer": "infer_part"}.get(stage, "train_step")
    name = f"{stage}_killed"
    shutil.rmtree(root / name, ignore_errors=True)
    codes = run(root, stage, name, world_size, fault=f"{point}={rank}:{index}")
    killed = codes != [0] * ranks
    partial = partial_files(root / name)
    assert run(root, stage, name, world_size) == [0] * ranks, f"{stage}: the rerun failed"
    same, lost, duplicated = compare(root, stage, root / f"{stage}_reference", root / name)
    return Outcome(stage, rank, index, killed, partial, same, lost, duplicated)


def partial_files(output: Path) -> List[str]:
    """Files under a final name that are not complete: a Parquet part without its sidecar or that does
    not read, a checkpoint directory without its metadata, a record that is not JSON."""
    bad = []
    for part in output.rglob("*.parquet"):
        if part.name.startswith("."):
            continue
        try:
            pq.read_metadata(part)
        except Exception:  # any unreadable part is what this check exists to find
            bad.append(str(part))
            continue
        if not sidecar_path(part).exists() and "data" not in part.parts:
            bad.append(str(part))
    for directory in output.rglob(f"{CHECKPOINTS}/*"):
        if directory.is_dir() and not directory.name.startswith(".") and not (directory / ".metadata").exists():
            bad.append(str(directory))
    for record in [*output.rglob("*.json")]:
        if record.name.startswith("."):
            continue
        try:
            json.loads(record.read_text())
        except ValueError:
            bad.append(str(record))
    return bad


def compare(root: Path, stage: str, reference: Path, rerun: Path):
    """(same result, rows lost, rows duplicated) of a rerun against the uninterrupted run."""
    if stage in ("infer", "score"):
        column = "teacher_dcn" if stage == "infer" else "probability"
        want, got = _rows(reference, column), _rows(rerun, column)
        lost = len(set(want) - set(got))
        duplicated = sum(count - 1 for count in _counts(rerun).values() if count > 1)
        same = lost == 0 and duplicated == 0 and all(np.isclose(got[k], want[k], atol=1e-6) for k in want)
        return same, lost, duplicated
    if stage == "compress":
        a, b = (json.loads((p / COMPRESS_RECORD).read_text())["chains"] for p in (reference, rerun))
        same = all(_close({k: v for k, v in x.items() if k != "output"}, {k: v for k, v in y.items() if k != "output"})
                   for x, y in zip(a["afm"], b["afm"]))
        return same, 0, 0
    a, b = (json.loads((p / TRAIN_RECORD).read_text()) for p in (reference, rerun))
    return _close(a["test"], b["test"]) and a["steps"] == b["steps"], 0, 0


def _rows(output: Path, column: str) -> Dict[int, float]:
    values: Dict[int, float] = {}
    for part in sorted(output.rglob("*.parquet")):
        if part.name.startswith("."):
            continue
        table = pq.read_table(part, columns=["row_id", column])
        values.update(zip(table.column("row_id").to_pylist(), table.column(column).to_pylist()))
    return values


def _counts(output: Path) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for part in output.rglob("*.parquet"):
        if part.name.startswith("."):
            continue
        for row_id in pq.read_table(part, columns=["row_id"]).column("row_id").to_pylist():
            counts[row_id] = counts.get(row_id, 0) + 1
    return counts


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 2e-5 * max(1.0, abs(a)) or (a != a and b != b)
    return a == b
