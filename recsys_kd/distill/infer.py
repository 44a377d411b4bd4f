"""The ``infer`` stage: a teacher ensemble scores the logs once, writing soft labels aligned to them.

Top-down: join the process group; build every teacher from its training record and put them in one
module that DistributedModelParallel shards (teachers of any architecture mix); load each teacher's
checkpoint into its part of the sharded ensemble; then, split by split, each rank scores whole
input parts (part i on rank i mod N) row group by row group, and writes an output part that mirrors
the input part: same rows, same order, same row groups, columns ``row_id``, ``teacher_<name>``
(logits) and, with ``hints``, ``hint_<name>`` (the teacher's hidden vector, the input of its output
layer, as a fixed-size list<float32>: ECKD's hint regression). Output parts are written under a
temporary name, renamed when complete, and followed by a sidecar JSON (rows, row_id checksum,
columns): a rerun after a crash skips the parts that are complete and redoes the rest (a part written
with other columns counts as missing). ``side.json`` makes the output a side input of the reader,
and :func:`verify_alignment` checks it against the logs before distillation.

Sharded lookups are collective, so ranks step together: a rank with fewer batches in a round pads.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from recsys_kd.config import to_dict
from recsys_kd.data.ids import splitmix64
from recsys_kd.data.reader import ParquetReader, ReaderConfig, padding_batch
from recsys_kd.data.schema import ROW_ID, Schema, SchemaError
from recsys_kd.distill.config import hint_column, teacher_column
from recsys_kd.distributed import init_distributed, max_over_ranks, sum_over_ranks
from recsys_kd.io import atomic_write_json
from recsys_kd.models.zoo import CTRModel, build_model
from recsys_kd.runs import INFER_RECORD, SIDE_INPUT_FILE, OutputError, TrainOutput
from recsys_kd.train import checkpoint, hooks
from recsys_kd.train.sharding import ShardingConfig, describe_plan, shard


@dataclass
class TeacherSpec:
    """A trained teacher: ``train_output`` is a ``recsys-kd train`` output directory."""

    name: str
    train_output: str
    checkpoint: str = "best"


@dataclass
class InferConfig:
    teachers: List[TeacherSpec] = field(default_factory=list)
    output: str = ""
    splits: List[str] = field(default_factory=lambda: ["train", "valid", "test"])
    batch_size: int = 8192
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    progress: bool = True
    # also write each teacher's hidden vector (hint) per row, for ECKD hint regression
    hints: bool = False

    def validate(self) -> None:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class TeacherEnsemble(nn.Module):
    """Several CTR models over the same features, evaluated together.

    Shapes: ``dense [B, n_dense]``, ``sparse`` KJT -> ``(logits [B, M], hints [B, sum_i H_i])``
    (teachers in given order; ``hints`` the teachers' hidden vectors side by side, widths
    :attr:`hint_dims`, or ``None`` unless built with ``hints=True``).
    """

    def __init__(self, teachers: Dict[str, CTRModel], hints: bool = False) -> None:
        super().__init__()
        self.names = list(teachers)
        self.teachers = nn.ModuleDict(teachers)
        self.hints = hints
        self.hint_dims = [teachers[name].hidden_dim for name in self.names]

    def forward(self, dense: torch.Tensor, sparse) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        outputs = [self.teachers[name].forward_with_hidden(dense, sparse) for name in self.names]
        logits = torch.stack([logit for logit, _, _ in outputs], dim=1)
        return logits, torch.cat([hidden for _, hidden, _ in outputs], dim=1) if self.hints else None


def infer(config: InferConfig, dataset: Path) -> Dict[str, Any]:
    """Runs (or completes) inference; returns the record written to ``<output>/infer.json``."""
    if not config.teachers:
        raise SchemaError("infer: no teachers configured (infer.teachers)")
    ctx = init_distributed(config.backend)
    output = Path(config.output)
    schema = Schema.load(dataset)
    teachers, records = _build_teachers(config, schema)
    ensemble = TeacherEnsemble(teachers, hints=config.hints)
    dmp, plan = shard(ensemble, config.sharding, ctx)
    _load_teachers(dmp, config)
    dmp.eval()
    started, rows_scored = time.time(), 0
    columns = [teacher_column(t.name) for t in config.teachers]
    vectors = ({hint_column(t.name): width for t, width in zip(config.teachers, ensemble.hint_dims)}
               if config.hints else {})
    for split in config.splits:
        rows_scored += _score_split(config, ctx, dmp, dataset, schema, split, output, columns, vectors)
    seconds = time.time() - started
    record = {
        "stage": "infer",
        "dataset": str(dataset),
        "output": str(output),
        "world_size": ctx.world_size,
        "config": to_dict(config),
        "teachers": {t.name: {"model": records[t.name]["model"], "test": records[t.name].get("test"),
                              "parameters": records[t.name]["parameters"],
                              "flops_per_example": records[t.name]["flops_per_example"]} for t in config.teachers},
        "columns": columns,
        "vectors": vectors,
        "sharding_plan": describe_plan(plan),
        "rows_scored_this_run": sum_over_ranks(rows_scored),
        "seconds_this_run": round(seconds, 3),
        "peak_rss_mib_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    record["rows_per_second_this_run"] = round(record["rows_scored_this_run"] / max(seconds, 1e-9), 1)
    if ctx.is_main:
        splits = {split: {"files": schema.split(split).files, "rows": schema.split(split).rows} for split in config.splits}
        atomic_write_json(output / SIDE_INPUT_FILE,
                          {"dataset": str(dataset), "columns": columns, "vectors": vectors, "splits": splits})
        atomic_write_json(output / INFER_RECORD, record)
    dist.barrier()
    return record


def _build_teachers(config: InferConfig, schema: Schema) -> Tuple[Dict[str, nn.Module], Dict[str, Dict]]:
    teachers, records = {}, {}
    for spec in config.teachers:
        source = TrainOutput(spec.train_output)
        if not source.finished():
            raise OutputError(f"teacher {spec.name!r}: {source.record_path} not found; train it first")
        teachers[spec.name] = build_model(schema, checkpoint.recorded_model_config(source))
        records[spec.name] = source.record
    return teachers, records


def _load_teachers(dmp: nn.Module, config: InferConfig) -> None:
    """Each teacher's checkpoint (saved from its task module, keys ``model.*``) into its slice of
    the sharded ensemble (keys ``teachers.<name>.*``); DCP reshards as needed."""
    state = dmp.state_dict()
    for spec in config.teachers:
        prefix = f"teachers.{spec.name}."
        path = TrainOutput(spec.train_output).checkpoint(spec.checkpoint)
        part = {"model." + key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        loaded = {"model": part}
        checkpoint.load_state(path, loaded)
        for key, value in loaded["model"].items():
            state[prefix + key[len("model."):]] = value
    dmp.load_state_dict(state)


def _score_split(config, ctx, dmp, dataset: Path, schema: Schema, split: str, output: Path, columns: List[str],
                 vectors: Dict[str, int]) -> int:
    reader = ParquetReader(dataset, split, ReaderConfig(batch_size=config.batch_size), ctx.rank, ctx.world_size)
    files = schema.split(split).files
    if ctx.is_main:
        for stale in (output / split).glob(".*.tmp"):  # parts a killed run had begun
            stale.unlink()
    dist.barrier()
    scored = 0
    rounds = -(-len(files) // ctx.world_size)
    bar = tqdm(total=len(files), desc=f"infer {split}", unit="part", disable=not (config.progress and ctx.is_main))
    for round_index in range(rounds):
        index = round_index * ctx.world_size + ctx.rank
        mine = index < len(files) and not part_complete(output, split, files[index], reader.file_row_groups(index),
                                                        [*columns, *vectors])
        groups = reader.file_row_groups(index) if mine else []
        steps = max_over_ranks(sum(-(-rows // config.batch_size) for rows in groups))
        batches = reader.file_batches(index) if mine else iter(())
        if mine:
            _parts_started[0] += 1
            hooks.reached("infer_part", ctx.rank, _parts_started[0])
        writer = _PartWriter(output, split, files[index], columns, vectors) if mine else None
        padding = None
        with torch.no_grad():
            for _ in range(steps):
                item = next(batches, None)
                if item is None:
                    padding = padding or padding_batch(schema, config.batch_size)
                    dmp(padding.dense.to(ctx.device), padding.sparse.to(ctx.device))
                    continue
                row_group, batch = item
                logits, hints = dmp(batch.dense.to(ctx.device), batch.sparse.to(ctx.device))
                hints = hints.float().cpu().numpy() if hints is not None else None
                writer.add(row_group, batch.row_ids.numpy(), logits.float().cpu().numpy(), hints)
                scored += batch.batch_size
        if writer is not None:
            writer.close()
        bar.update(min(ctx.world_size, len(files) - round_index * ctx.world_size))
    bar.close()
    dist.barrier()
    return scored


_parts_started = [0]  # parts this process began scoring, announced to hooks (train.hooks "infer_part")


class _PartWriter:
    """Writes one output part mirroring an input part's row groups; publishes it when complete.

    ``columns``: one float32 logit column per teacher; ``vectors``: hint column -> width H, each a
    fixed-size list<float32>[H] column (in teacher order, as the ensemble concatenates them)."""

    def __init__(self, output: Path, split: str, relative: str, columns: List[str], vectors: Dict[str, int]) -> None:
        self.final = output / relative
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.final.with_name(f".{self.final.name}.{os.getpid()}.tmp")
        self.columns = columns
        self.vectors = vectors
        self.schema = pa.schema([(ROW_ID, pa.int64())] + [(name, pa.float32()) for name in columns]
                                + [(name, pa.list_(pa.float32(), width)) for name, width in vectors.items()])
        self.writer = pq.ParquetWriter(self.temp, self.schema, compression="zstd")
        self.group: Optional[int] = None
        self.pending: List[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []
        self.rows = 0
        self.row_ids: List[np.ndarray] = []

    def add(self, row_group: int, row_ids: np.ndarray, logits: np.ndarray, hints: Optional[np.ndarray]) -> None:
        """``row_ids [B]``, ``logits [B, M]``, ``hints [B, sum H]`` (None without vectors)."""
        if self.group is not None and row_group != self.group:
            self._flush()
        self.group = row_group
        self.pending.append((row_ids.copy(), logits.copy(), hints.copy() if hints is not None else None))

    def _flush(self) -> None:
        row_ids = np.concatenate([r for r, _, _ in self.pending])
        logits = np.concatenate([l for _, l, _ in self.pending])
        data = {ROW_ID: row_ids, **{name: logits[:, j] for j, name in enumerate(self.columns)}}
        if self.vectors:
            hints = np.concatenate([h for _, _, h in self.pending])
            start = 0
            for name, width in self.vectors.items():
                flat = np.ascontiguousarray(hints[:, start:start + width]).reshape(-1)
                data[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
                start += width
        table = pa.table(data, schema=self.schema)
        self.writer.write_table(table, row_group_size=len(row_ids))
        self.rows += len(row_ids)
        self.row_ids.append(row_ids)
        self.pending = []

    def close(self) -> None:
        if self.pending:
            self._flush()
        self.writer.close()
        os.replace(self.temp, self.final)
        ids = np.concatenate(self.row_ids) if self.row_ids else np.zeros(0, np.int64)
        atomic_write_json(_sidecar(self.final), {"rows": self.rows, "row_id_checksum": row_id_checksum(ids),
                                                 "columns": [*self.columns, *self.vectors]})


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def row_id_checksum(row_ids: np.ndarray) -> str:
    """Order-independent digest of a part's row ids (count, sum and xor of their hashes)."""
    hashed = splitmix64(row_ids.astype(np.int64).view(np.uint64))
    total = int(row_ids.astype(np.int64).sum()) if len(row_ids) else 0
    mixed = int(np.bitwise_xor.reduce(hashed)) if len(row_ids) else 0
    return f"{len(row_ids)}:{total}:{mixed:016x}"


def part_complete(output: Path, split: str, relative: str, row_groups: List[int], columns: List[str]) -> bool:
    """Whether ``output/relative`` was published with these ``columns`` and every row of the input part."""
    part = output / relative
    sidecar = _sidecar(part)
    if not (part.exists() and sidecar.exists()):
        return False
    written = json.loads(sidecar.read_text())
    return written["rows"] == sum(row_groups) and written.get("columns") == columns


def verify_alignment(dataset: Path, side: Path, splits: Optional[List[str]] = None) -> Dict[str, int]:
    """Checks every part of ``side`` against the dataset's part: row counts and row_id checksums.
    Raises SchemaError naming the first part that differs; returns rows per split."""
    schema = Schema.load(dataset)
    manifest_path = Path(side) / SIDE_INPUT_FILE
    if not manifest_path.exists():
        raise SchemaError(f"{side}: {SIDE_INPUT_FILE} missing or incomplete: infer has not finished; rerun it")
    manifest = json.loads(manifest_path.read_text())
    checked = {}
    for split in splits or list(manifest["splits"]):
        rows = 0
        for relative in schema.split(split).files:
            sidecar = _sidecar(Path(side) / relative)
            if not sidecar.exists():
                raise SchemaError(f"{side}: part {relative} is missing or incomplete; rerun infer to finish it")
            expected = json.loads(sidecar.read_text())
            ids = pq.read_table(Path(dataset) / relative, columns=[ROW_ID]).column(ROW_ID).to_numpy()
            if expected["row_id_checksum"] != row_id_checksum(ids):
                raise SchemaError(
                    f"{side}/{relative} is not aligned with {dataset}/{relative}: {expected['rows']} rows with "
                    f"checksum {expected['row_id_checksum']}, the logs have {len(ids)} rows ({row_id_checksum(ids)})"
                )
            rows += len(ids)
        checked[split] = rows
    return checked
