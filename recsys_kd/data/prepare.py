"""The ``prepare`` stage: raw logs (or the synthetic generator) -> a Parquet dataset + schema.json.

Top-down: open the source; if vocabularies or a count-based split need it, stream it once to count
(this pass fills the quarantine); build vocabularies and with them the features' id rules; stream it
again mapping values to ids (:class:`~recsys_kd.data.id_rules.IdRules`, as ``score`` does for raw logs)
and rows to splits, writing Parquet parts; write schema, vocabularies, quarantine and a JSON record.
Everything is built in a staged directory renamed into place at the end, so a crash never leaves a
partial dataset under the final name; a rerun removes the staging directories killed runs left
(``.<name>.XXXXXXXX.tmp`` beside the output). When too many rows are refused, the quarantine is kept
beside the output as ``<name>.quarantine.jsonl`` (removed by the next successful run).

On N ranks (torchrun / torchx; the output on storage every rank sees) the same steps run on every
rank over its share of the input: files and byte ranges of plain files cut at line starts (Parquet
at row group starts; :mod:`~recsys_kd.data.sections`), placed by a count of their lines so row_ids and
quarantined line numbers are one process's; statistics a source fits over the whole input (``format:
table``'s standardize) are gathered as exact sums. Hash ids need nothing more; vocabulary counts meet in hash-partitioned
files (:mod:`~recsys_kd.data.vocabularies`) and are ordered as one process orders them; count-based splits
use the global count and each rank's offset in it. Each rank writes its parts and quarantine in its
own folder of rank 0's staging directory; rank 0 moves them into the one-process layout (parts
numbered in rank order, so in input order), writes schema and record (``world_size``, each rank's
rows and seconds) and alone renames the directory into place. Every step ends in one collective
carrying every rank's verdict, so a failure on any rank fails all of them, at the same step.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Counter, Dict, Iterable, Iterator, List, Literal, Optional

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
from recsys_kd.data.quarantine import Quarantine, too_many_bad_rows
from recsys_kd.data.schema import RESERVED_IDS, IdRule, Schema, SparseFeature, SplitInfo
from recsys_kd.data.sections import placed_sections
from recsys_kd.data.source import LABEL, InputError, RawSource, Section, SourceChunk
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.data.table_spec import TableOptions
from recsys_kd.data.vocabularies import VOCAB_SCRATCH, write_vocabularies
from recsys_kd.distributed import DistributedContext, from_rank, gather_outcome, launched_context
from recsys_kd.io import atomic_file, atomic_write_json, naming, prefetch, staged_directory
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
    """Runs the stage, on this process's rank of a launched job (torchrun / torchx) or alone; returns
    the record, which rank 0 writes as ``prepare.json``."""
    started = time.time()
    pin_mmap_threshold()
    ranks = launched_context()
    output = Path(config.output)
    opened: Dict[str, RawSource] = {}

    def open_and_stage() -> Optional[str]:
        """Every rank opens the source; rank 0 makes the staging directory."""
        opened["source"] = open_source(config)
        return str(_staging(publishing, output, config.overwrite)) if ranks.is_main else None

    try:
        with contextlib.ExitStack() as publishing:
            staging = Path(gather_outcome(open_and_stage)[0])
            source = opened["source"]
            record = _build(config, source, staging, output, started, ranks)
            from_rank(0, publishing.close)  # the rename into place; every rank learns whether it worked
    except OSError as error:
        named = naming(error, output)
        if named is error:
            raise
        raise named from error
    if ranks.is_main:
        kept_quarantine(output).unlink(missing_ok=True)  # a failed run's, now outdated
    return record


def _staging(publishing: contextlib.ExitStack, output: Path, overwrite: bool) -> Path:
    """Rank 0's staging directory, renamed into place when ``publishing`` closes without an error."""
    remove_stale_staging(output)
    return publishing.enter_context(staged_directory(output, overwrite=overwrite))


@dataclass
class _Rank:
    """This rank's share: its sections (None: the whole input, one process) and where it writes: the
    staging directory itself when alone, else its own ``.rank-RRRRR`` folder in it."""

    rank: int
    world_size: int
    sections: Optional[List[Section]]
    directory: Path
    started: float

    @property
    def quarantine(self) -> Path:
        return self.directory / QUARANTINE_FILE


def _build(config: PrepareConfig, source: RawSource, staging: Path, output: Path, started: float,
           ranks: DistributedContext) -> Dict:
    """The dataset, built in ``staging`` by every rank; returns the record.

    Each step is local work followed by one collective that carries every rank's result and verdict
    (:func:`~recsys_kd.distributed.gather_outcome`), so all ranks take the same steps and fail together.
    """
    me = _Rank(ranks.rank, ranks.world_size, None, staging, started)
    if ranks.world_size > 1:
        me.directory = staging / f".rank-{ranks.rank:05d}"
        me.sections = placed_sections(source, me.rank, me.world_size)
    if hasattr(source, "fit"):  # statistics of the whole input the conversion needs (collective)
        source.fit(me.sections, me.rank)
    keep_at = kept_quarantine(output)
    counter = VocabularyCounter(_vocab_features(source)) if config.ids.rule == "vocab" else None
    kept_rows = first_position = None
    quarantined: Dict[str, int] = {}
    if counter is not None or config.split.needs_count:
        counted = gather_outcome(lambda: _count_pass(config, source, me, counter))
        kept_rows = sum(c["rows"] for c in counted)
        first_position = sum(c["rows"] for c in counted[: me.rank])
        quarantined = _summed(c["quarantined"] for c in counted)
        _check_bad_rows(quarantined, kept_rows, config, me, keep_at)
    if counter is not None:
        min_counts = {name: _min_count(config, name) for name in counter.features}
        write_vocabularies(counter, min_counts, staging, me.rank, me.world_size)
    written = gather_outcome(lambda: _write_pass(config, source, staging, me, kept_rows, first_position))
    if kept_rows is None:
        quarantined = _summed(w["quarantined"] for w in written)
    rows = sum(w["rows"] for w in written)
    _check_bad_rows(quarantined, rows, config, me, keep_at)
    if rows == 0:
        why = f"all {sum(quarantined.values())} refused" if quarantined else "empty, or a header alone"
        raise InputError(f"prepare: no rows to convert in {', '.join(source.info.inputs) or source.info.name} ({why})")
    return from_rank(0, lambda: _finish(config, source, staging, output, written, quarantined, started))


def _count_pass(config: PrepareConfig, source: RawSource, me: _Rank, counter: Optional[VocabularyCounter]) -> Dict:
    """The first pass: counts kept rows (and values, for vocabularies); fills this rank's quarantine."""
    quarantine = Quarantine(me.quarantine)
    rows = 0
    for chunk in _chunks(config, source, quarantine, me, "count"):
        rows += chunk.table.num_rows
        if counter is not None and chunk.table.num_rows:
            counter.update(chunk.table)
    quarantine.close()
    return {"rows": rows, "quarantined": quarantine.summary()}


def _check_bad_rows(quarantined: Dict[str, int], kept_rows: int, config: PrepareConfig, me: _Rank, keep_at: Path) -> None:
    """Every rank raises TooManyBadRows when the refused share of all ranks' rows is too high (the same
    verdict everywhere, from gathered counts); rank 0 first keeps the quarantine beside the output."""
    rows_seen = kept_rows + sum(quarantined.values())
    error = too_many_bad_rows(quarantined, rows_seen, config.max_bad_fraction, keep_at)
    if error is not None:
        if me.rank == 0:
            _merge_quarantine(me, keep_at)
        raise error


def _merge_quarantine(me: _Rank, target: Path) -> None:
    """The ranks' quarantines, in rank order (so in input order), as one file at ``target``."""
    if me.world_size == 1:
        os.replace(me.quarantine, target)
        return
    with atomic_file(target) as temp, open(temp, "wb") as merged:
        for rank in range(me.world_size):
            part = me.directory.parent / f".rank-{rank:05d}" / QUARANTINE_FILE
            if part.exists():
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, merged)


def _min_count(config: PrepareConfig, name: str) -> int:
    return config.ids.min_counts.get(name, config.ids.min_count)


def _write_pass(config: PrepareConfig, source: RawSource, staging: Path, me: _Rank, kept_rows: Optional[int],
                first_position: Optional[int]) -> Dict:
    """The second pass: ids and splits, this rank's rows written as Parquet parts in its directory
    (the quarantine filled here when no count pass did). Returns what the record and schema need."""
    from recsys_kd.data.writer import SplitWriter

    vocabularies = {
        name: pq.read_table(staging / vocab_file(name), columns=["value"]).column("value").combine_chunks()
        for name in _vocab_features(source)
    } if config.ids.rule == "vocab" else {}
    rules = IdRules(_schema(config, source, vocabularies), vocabularies)
    quarantine = Quarantine(me.quarantine) if kept_rows is None else None
    ranks = splitting.permutation_ranks(kept_rows, config.split.seed) if config.split.method == "permutation" else None
    writers: Dict[str, SplitWriter] = {}
    position = first_position or 0
    for chunk in _chunks(config, source, quarantine, me, "write"):
        table = chunk.table
        if table.num_rows == 0:
            continue
        converted = rules.apply(table)
        if not writers:
            writers = {
                name: SplitWriter(me.directory, name, converted.schema, config.row_group_rows, config.rows_per_part)
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
    if quarantine is not None:
        quarantine.close()
    return {
        "splits": {name: {"files": w.files, "rows": w.rows, "positives": w.positives, "checksums": w.checksums}
                   for name, w in writers.items()},
        "rows": sum(w.rows for w in writers.values()),
        "quarantined": quarantine.summary() if quarantine is not None else {},
        "dropped_by_rule": dict(source.dropped_by_rule),
        "seconds": round(time.time() - me.started, 3),
    }


def _finish(config: PrepareConfig, source: RawSource, staging: Path, output: Path, written: List[Dict],
            quarantined: Dict[str, int], started: float) -> Dict:
    """Rank 0: the ranks' parts and quarantines gathered into the dataset's layout, schema.json and
    the record."""
    world_size = len(written)
    splits = {name: _gathered_split(staging, name, written) for name in splitting.SPLITS}
    if world_size > 1:
        _merge_quarantine(_Rank(0, world_size, None, staging / ".rank-00000", started), staging / QUARANTINE_FILE)
        for scratch in [staging / VOCAB_SCRATCH, *staging.glob(".rank-*")]:
            shutil.rmtree(scratch, ignore_errors=True)
    vocabularies = {name: pq.read_table(staging / vocab_file(name), columns=["value"]).column("value")
                    for name in _vocab_features(source)} if config.ids.rule == "vocab" else {}
    schema = _schema(config, source, vocabularies).replace(splits=splits)
    schema.save(staging)
    record = {
        "stage": "prepare",
        "output": str(output),
        "inputs": describe_inputs(source.info.inputs),
        "config": to_dict(config),
        "rows": {name: info.rows for name, info in splits.items()},
        "positives": {name: info.positives for name, info in splits.items()},
        "quarantined": dict(sorted(quarantined.items())),
        "quarantined_total": sum(quarantined.values()),
        "dropped_by_rule": _summed(w["dropped_by_rule"] for w in written),
        "features": {"dense": len(schema.dense), "sparse": len(schema.sparse)},
        "num_embeddings": schema.num_embeddings,
        "world_size": world_size,
        "ranks": [{"rank": rank, "rows": w["rows"], "seconds": w["seconds"]} for rank, w in enumerate(written)],
        "seconds": round(time.time() - started, 3),
    }
    record["rows_per_second"] = round(sum(record["rows"].values()) / max(record["seconds"], 1e-9), 1)
    atomic_write_json(staging / PREPARE_RECORD, record)
    return record


def _gathered_split(staging: Path, name: str, written: List[Dict]) -> SplitInfo:
    """One split's parts: alone, as written; on N ranks, each rank's parts moved, in rank order, to
    ``<split>/part-NNNNN.parquet`` (so reading the parts in order reads the rows in input order)."""
    pieces = [w["splits"].get(name) for w in written]
    if len(written) == 1:
        piece = pieces[0] or {"files": [], "rows": 0, "positives": 0, "checksums": {}}
        return SplitInfo(files=piece["files"], rows=piece["rows"], positives=piece["positives"], checksums=piece["checksums"])
    files: List[str] = []
    checksums: Dict[str, str] = {}
    for rank, piece in enumerate(pieces):
        for relative in (piece or {}).get("files", []):
            moved = f"{name}/part-{len(files):05d}.parquet"
            (staging / name).mkdir(exist_ok=True)
            os.replace(staging / f".rank-{rank:05d}" / relative, staging / moved)
            files.append(moved)
            checksums[moved] = piece["checksums"][relative]
    return SplitInfo(files=files, rows=sum(p["rows"] for p in pieces if p), positives=sum(p["positives"] for p in pieces if p),
                     checksums=checksums)


def _summed(counts: Iterable[Dict[str, int]]) -> Dict[str, int]:
    total: Counter[str] = collections.Counter()
    for count in counts:
        total.update(count)
    return dict(sorted(total.items()))


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


def _chunks(config: PrepareConfig, source: RawSource, quarantine: Optional[Quarantine], me: _Rank, label: str) -> Iterator[SourceChunk]:
    """This rank's chunks (its sections, or the whole input), with a progress bar on rank 0."""
    total = source.progress_total() if me.sections is None else sum(section.size for section in me.sections)
    with tqdm(
        total=total, desc=f"prepare {label}", unit="B" if source.info.name != "synthetic" else "row",
        unit_scale=True, disable=not config.progress or me.rank != 0, mininterval=1.0,
    ) as bar:
        for chunk in prefetch(source.chunks(quarantine, me.sections), depth=1):
            bar.update(chunk.progress)
            yield chunk


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
        sparse.append(SparseFeature(name=name, num_embeddings=size, id_rule=rule, multi_hot=name in info.multi_hot,
                                    weighted=name in info.weighted))
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
