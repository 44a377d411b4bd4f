"""The ``prepare`` stage: raw logs (or the synthetic generator) -> a Parquet dataset + schema.json.

Top-down: open the source; if vocabularies or a count-based split need it, stream it once to count
(this pass fills the quarantine); build vocabularies and with them the features' id rules; stream it
again mapping values to ids (:class:`~recsys_kd.data.id_rules.IdRules`, as ``score`` does for raw logs)
and rows to splits, writing Parquet parts; write schema, vocabularies, quarantine and a JSON record.
Everything is built in a staged directory renamed into place at the end, so a crash never leaves a
partial dataset under the final name; a rerun removes the staging directories killed runs left
(``.<name>.XXXXXXXX.tmp`` beside the output). When too many rows are refused, the quarantine is kept
beside the output as ``<name>.quarantine.jsonl`` (removed by the next successful run).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_kd.config import to_dict
from recsys_kd.data import split as splitting
from recsys_kd.data.criteo import CriteoOptions
from recsys_kd.data.id_rules import IdRules, feature_salt, vocab_file
from recsys_kd.data.ids import VocabularyCounter
from recsys_kd.data.libsvm import LibSVMOptions
from recsys_kd.data.movielens import MovieLensOptions
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.schema import RESERVED_IDS, IdRule, Schema, SparseFeature, SplitInfo
from recsys_kd.data.source import LABEL, InputError, RawSource, SourceChunk
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.data.table_spec import TableOptions
from recsys_kd.io import atomic_write_json, naming, prefetch, staged_directory
from recsys_kd.memory import pin_mmap_threshold
from recsys_kd.runs import PREPARE_RECORD, QUARANTINE_FILE


@dataclass
class IdConfig:
    """``hash``: every sparse feature hashed into ``num_embeddings`` ids (``sizes`` overrides per
    feature); ``vocab``: a vocabulary of values seen at least ``min_count`` times in the whole
    input (``min_counts`` overrides per feature), the rest share the out-of-vocabulary id."""

    rule: Literal["hash", "vocab"] = "hash"
    num_embeddings: int = 1_000_000
    sizes: Dict[str, int] = field(default_factory=dict)
    min_count: int = 1
    min_counts: Dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> None:
        for name, size in {"num_embeddings": self.num_embeddings, **self.sizes}.items():
            if size <= RESERVED_IDS:
                raise ValueError(f"ids: {name} must be > {RESERVED_IDS} (ids 0, 1 are reserved), got {size}")


@dataclass
class PrepareConfig:
    """Where the raw data is, how to turn it into ids and splits, and where the dataset goes."""

    format: Literal["criteo", "avazu", "movielens", "table", "libsvm", "synthetic"] = "synthetic"
    inputs: List[str] = field(default_factory=list)
    output: str = "runs/data"
    ids: IdConfig = field(default_factory=IdConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    criteo: CriteoOptions = field(default_factory=CriteoOptions)
    movielens: MovieLensOptions = field(default_factory=MovieLensOptions)
    table: TableOptions = field(default_factory=TableOptions)
    libsvm: LibSVMOptions = field(default_factory=LibSVMOptions)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_bad_fraction: Optional[float] = 0.01
    row_group_rows: int = 65536
    rows_per_part: int = 4_194_304
    block_bytes: int = 16 << 20
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.format != "synthetic" and not self.inputs:
            raise ValueError(f"format {self.format!r} needs inputs (files or a directory)")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.row_group_rows <= 0:
            raise ValueError(f"row_group_rows must be positive, got {self.row_group_rows}")


def prepare(config: PrepareConfig) -> Dict:
    """Runs the stage; returns (and writes as ``prepare.json``) the record of what it did."""
    started = time.time()
    pin_mmap_threshold()
    source = open_source(config)
    output = Path(config.output)
    remove_stale_staging(output)
    try:
        with staged_directory(output, overwrite=config.overwrite) as staging:
            record = _build(config, source, staging, output, started)
    except OSError as error:
        named = naming(error, output)
        if named is error:
            raise
        raise named from error
    kept_quarantine(output).unlink(missing_ok=True)  # a failed run's, now outdated
    return record


def _build(config: PrepareConfig, source: RawSource, staging: Path, output: Path, started: float) -> Dict:
    """The dataset, built in ``staging``; returns the record."""
    quarantine = Quarantine(staging / QUARANTINE_FILE)
    keep_at = kept_quarantine(output)
    counter = VocabularyCounter(_vocab_features(source)) if config.ids.rule == "vocab" else None
    kept_rows = None
    if counter is not None or config.split.needs_count:
        kept_rows = _count_pass(config, source, quarantine, counter)
        quarantine.check(kept_rows + quarantine.total, config.max_bad_fraction, keep_at)
    vocabularies = _write_vocabularies(staging, counter, config) if counter is not None else {}
    schema = _schema(config, source, vocabularies)  # its splits are known after the write pass
    rules = IdRules(schema, vocabularies)
    writers = _write_pass(config, source, staging, quarantine if kept_rows is None else None, kept_rows, rules)
    quarantine.close()
    rows_seen = sum(w.rows for w in writers.values()) + quarantine.total
    quarantine.check(rows_seen, config.max_bad_fraction, keep_at)
    if not writers:
        why = f"all {quarantine.total} refused" if quarantine.total else "empty, or a header alone"
        raise InputError(f"prepare: no rows to convert in {', '.join(source.info.inputs) or source.info.name} ({why})")
    schema = schema.replace(splits={
        name: SplitInfo(files=writer.files, rows=writer.rows, positives=writer.positives, checksums=writer.checksums)
        for name, writer in writers.items()
    })
    schema.save(staging)
    record = {
        "stage": "prepare",
        "output": str(output),
        "inputs": describe_inputs(source.info.inputs),
        "config": to_dict(config),
        "rows": {name: writer.rows for name, writer in writers.items()},
        "positives": {name: writer.positives for name, writer in writers.items()},
        "quarantined": quarantine.summary(),
        "quarantined_total": quarantine.total,
        "dropped_by_rule": dict(source.dropped_by_rule),
        "features": {"dense": len(schema.dense), "sparse": len(schema.sparse)},
        "num_embeddings": schema.num_embeddings,
        "seconds": round(time.time() - started, 3),
    }
    record["rows_per_second"] = round(sum(record["rows"].values()) / max(record["seconds"], 1e-9), 1)
    atomic_write_json(staging / PREPARE_RECORD, record)
    return record


def kept_quarantine(output: Path) -> Path:
    """Where a run refused for too many bad rows keeps its quarantine: ``<output>.quarantine.jsonl``."""
    return output.with_name(f"{output.name}.{QUARANTINE_FILE}")


def remove_stale_staging(output: Path) -> None:
    """Removes the staging directories of killed runs of this output (``.<name>.XXXXXXXX.tmp``, as
    :func:`~recsys_kd.io.staged_directory` names them); no other output's."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[a-z0-9_]{{8}}\.tmp")
    if output.parent.is_dir():
        for path in output.parent.iterdir():
            if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def open_source(config: PrepareConfig) -> RawSource:
    inputs = [Path(p) for p in config.inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"prepare: input not found: {', '.join(missing)}")
    if config.format == "criteo":
        from recsys_kd.data.criteo import CriteoSource

        return CriteoSource(_expand(inputs), config.criteo, block_bytes=config.block_bytes)
    if config.format == "avazu":
        from recsys_kd.data.avazu import AvazuSource

        return AvazuSource(_expand(inputs), block_bytes=config.block_bytes)
    if config.format == "movielens":
        from recsys_kd.data.movielens import MovieLensSource

        return MovieLensSource(inputs, config.movielens, block_bytes=config.block_bytes)
    if config.format == "table":
        from recsys_kd.data.table import TableSource

        return TableSource(_expand(inputs), config.table, config.split, block_bytes=config.block_bytes)
    if config.format == "libsvm":
        from recsys_kd.data.libsvm import LibSVMSource

        return LibSVMSource(_expand(inputs), config.libsvm, block_bytes=config.block_bytes)
    from recsys_kd.data.synthetic import SyntheticSource

    return SyntheticSource(config.synthetic)


def _expand(inputs: List[Path]) -> List[Path]:
    files: List[Path] = []
    for path in inputs:
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    return files


def _vocab_features(source: RawSource) -> List[str]:
    return [name for name in source.info.sparse if name not in source.info.identity_sizes]


def _chunks(config: PrepareConfig, source: RawSource, quarantine: Optional[Quarantine], label: str) -> Iterator[SourceChunk]:
    with tqdm(
        total=source.progress_total(), desc=f"prepare {label}", unit="B" if source.info.name != "synthetic" else "row",
        unit_scale=True, disable=not config.progress, mininterval=1.0,
    ) as bar:
        for chunk in prefetch(source.chunks(quarantine), depth=1):
            bar.update(chunk.progress)
            yield chunk


def _count_pass(config: PrepareConfig, source: RawSource, quarantine: Quarantine, counter: Optional[VocabularyCounter]) -> int:
    rows = 0
    for chunk in _chunks(config, source, quarantine, "count"):
        rows += chunk.table.num_rows
        if counter is not None and chunk.table.num_rows:
            counter.update(chunk.table)
    return rows


def _write_vocabularies(staging: Path, counter: VocabularyCounter, config: PrepareConfig) -> Dict[str, pa.Array]:
    vocabularies = {}
    for name in counter.features:
        table = counter.vocabulary(name, config.ids.min_counts.get(name, config.ids.min_count))
        table = table.append_column("id", pa.array(np.arange(table.num_rows, dtype=np.int64) + RESERVED_IDS))
        path = staging / vocab_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        vocabularies[name] = table.column("value").combine_chunks()
    return vocabularies


def _write_pass(config, source, staging, quarantine, kept_rows, rules: IdRules):
    from recsys_kd.data.writer import SplitWriter

    ranks = splitting.permutation_ranks(kept_rows, config.split.seed) if config.split.method == "permutation" else None
    arrow_schema = None
    writers: Dict[str, SplitWriter] = {}
    position = 0
    for chunk in _chunks(config, source, quarantine, "write"):
        table = chunk.table
        if table.num_rows == 0:
            continue
        converted = rules.apply(table)
        if arrow_schema is None:
            arrow_schema = converted.schema
            writers = {
                name: SplitWriter(staging, name, arrow_schema, config.row_group_rows, config.rows_per_part)
                for name in splitting.SPLITS
            }
        assignment = splitting.assign(config.split, table, position, kept_rows, ranks)
        position += table.num_rows
        for index, name in enumerate(splitting.SPLITS):
            mask = assignment == index
            if mask.any():
                writers[name].write(converted.filter(pa.array(mask)))
    for writer in writers.values():
        writer.close()
    return writers


def _schema(config: PrepareConfig, source: RawSource, vocabularies: Dict[str, pa.Array]) -> Schema:
    """The dataset's schema without its splits: features with their id rules and sizes."""
    info = source.info
    sparse = []
    for name in info.sparse:
        if name in info.identity_sizes:
            rule, size = IdRule(kind="identity"), info.identity_sizes[name]
        elif config.ids.rule == "vocab":
            min_count = config.ids.min_counts.get(name, config.ids.min_count)
            rule = IdRule(kind="vocab", min_count=min_count, vocab_file=vocab_file(name))
            size = len(vocabularies[name]) + RESERVED_IDS
        else:
            rule = IdRule(kind="hash", seed=config.ids.seed + feature_salt(name))
            size = config.ids.sizes.get(name, config.ids.num_embeddings)
        sparse.append(SparseFeature(name=name, num_embeddings=size, id_rule=rule, multi_hot=name in info.multi_hot))
    return Schema(
        name=info.name,
        label=LABEL,
        dense=list(info.dense),
        sparse=sparse,
        extra=list(info.extra),
        dense_transform=info.dense_transform,
        source={"format": config.format, "inputs": json.dumps(info.inputs)},
    )


def describe_inputs(inputs: List[str]) -> List[Dict]:
    return [{"path": path, "bytes": Path(path).stat().st_size} for path in inputs if Path(path).exists()]
