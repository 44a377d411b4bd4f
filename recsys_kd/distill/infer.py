"""The ``infer`` stage: a teacher ensemble scores the logs once, writing soft labels aligned to them.

Top-down: join the process group; build every teacher from its training record and put them in one
module that DistributedModelParallel shards (teachers of any architecture mix); load each teacher's
checkpoint into its part of the sharded ensemble; then, split by split, each rank scores whole
input parts (dealt by :func:`~recsys_kd.data.parts.deal_parts`, the rows balanced) row group by row group, and writes an output part that mirrors
the input part: same rows, same order, same row groups, columns ``row_id``, ``teacher_<name>``
(logits) and, with ``hints``, ``hint_<name>`` (the teacher's hidden vector, the input of its output
layer, as a fixed-size list<float32>: ECKD's hint regression). Output parts are written under a
temporary name, renamed when complete, and followed by a sidecar JSON (rows, row_id checksum,
columns, the part's checksum): a rerun after a crash skips the parts that are complete and redoes the
rest (a part written with other columns counts as missing, and so does a damaged one: its checksum is
verified before it is skipped, and a warning names it). ``side.json`` makes the output a side input of
the reader, and :func:`~recsys_kd.data.side_inputs.verify_alignment` checks it against the logs before
distillation.

Sharded lookups are collective, so ranks step together: a rank whose parts are done pads until the
longest rank's are.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from recsys_kd.config import to_dict
from recsys_kd.data.batch import padding_batch
from recsys_kd.data.parts import PartWriter, deal_parts, part_complete, part_schema
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema, SchemaError
from recsys_kd.distill.config import hint_column, teacher_column
from recsys_kd.distributed import barrier, init_distributed, max_over_ranks, sum_over_ranks
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
    """Runs (or completes) inference; returns the record written to ``<output>/infer.json`` (written
    when this run scored rows or there is none yet)."""
    if not config.teachers:
        raise SchemaError("infer: no teachers configured (infer.teachers)")
    ctx = init_distributed(config.backend)
    output = Path(config.output)
    schema = Schema.load(dataset)
    teachers, records = _build_teachers(config, schema)
    ensemble = TeacherEnsemble(teachers, hints=config.hints)
    dmp, plan = shard(ensemble, config.sharding, ctx, config.batch_size)
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
    # A run that found every part complete leaves the files as they were: their time is when the soft
    # labels were made, which is what the stages reading them compare against.
    if ctx.is_main and (record["rows_scored_this_run"] or not (output / INFER_RECORD).exists()):
        splits = {split: {"files": schema.split(split).files, "rows": schema.split(split).rows} for split in config.splits}
        atomic_write_json(output / SIDE_INPUT_FILE,
                          {"dataset": str(dataset), "columns": columns, "vectors": vectors, "splits": splits})
        atomic_write_json(output / INFER_RECORD, record)
    barrier()
    return record


def _build_teachers(config: InferConfig, schema: Schema) -> Tuple[Dict[str, nn.Module], Dict[str, Dict]]:
    teachers, records = {}, {}
    for spec in config.teachers:
        source = TrainOutput(spec.train_output)
        if not source.finished():
            raise OutputError(f"teacher {spec.name!r}: {source.record_path} not found; train it first")
        # tables on the meta device: each rank materialises its shards, then loads them from the checkpoint
        teachers[spec.name] = build_model(schema, checkpoint.recorded_model_config(source), embedding_device=torch.device("meta"))
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
    barrier()
    scored = 0
    groups = [reader.file_row_groups(index) for index in range(len(files))]  # rows per row group, per part
    mine = [index for index in deal_parts([sum(rows) for rows in groups], ctx.world_size)[ctx.rank]
            if not part_complete(output / files[index], groups[index], [*columns, *vectors])]
    part_steps = [sum(-(-rows // config.batch_size) for rows in groups[index]) for index in mine]
    # the forward passes are collective: every rank takes the longest rank's count, padding after its own parts
    steps = max_over_ranks(sum(part_steps))
    bar = tqdm(total=len(mine), desc=f"infer {split}", unit="part", disable=not (config.progress and ctx.is_main))
    for index, own_steps in zip(mine, part_steps):
        _parts_started[0] += 1
        hooks.reached("infer_part", ctx.rank, _parts_started[0])
        writer = PartWriter(output / files[index], part_schema(columns, vectors))
        try:
            scored += _score_part(config, ctx, dmp, schema, reader.file_batches(index), own_steps, writer)
        except BaseException:
            writer.abort()  # no temporary left behind by a failed part
            raise
        writer.close()
        bar.update(1)
    _score_part(config, ctx, dmp, schema, iter(()), steps - sum(part_steps), None)
    bar.close()
    barrier()
    return scored


def _score_part(config, ctx, dmp, schema: Schema, batches, steps: int, writer: Optional[PartWriter]) -> int:
    """``steps`` collective forward passes: the batches of one part into ``writer``, then padding batches
    (a rank whose parts are done keeps stepping with the others). Returns rows scored."""
    scored, padding = 0, None
    with torch.no_grad():
        for _ in range(steps):
            item = next(batches, None)
            if item is None:
                padding = padding or padding_batch(schema, config.batch_size)
                dmp(padding.dense.to(ctx.device), padding.sparse.to(ctx.device))
                continue
            row_group, batch = item
            logits, hints = dmp(batch.dense.to(ctx.device), batch.sparse.to(ctx.device))
            values = logits.float() if hints is None else torch.cat([logits.float(), hints.float()], dim=1)
            writer.add(row_group, batch.row_ids.numpy(), values.cpu().numpy())
            scored += batch.batch_size
    return scored


_parts_started = [0]  # parts this process began scoring, announced to hooks (train.hooks "infer_part")
