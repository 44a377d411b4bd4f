"""The ``score`` stage: batch-score a prepared dataset split, or raw logs, with a serving artifact alone.

Only the artifact is loaded (:func:`~recsys_kd.export.artifact.load_artifact`, torch only): the model,
its feature order and its id rules all come from the artifact's ``schema.json``. Inputs:

- a prepared dataset directory (``schema.json`` + Parquet parts): every part of ``split`` is checked
  against the checksum ``schema.json`` records for it (``verify``), then read row group by row group. Its features must be the artifact's (names, order, ``num_embeddings``, id rules),
  otherwise the ids would mean other rows of the tables: the first difference is an error.
- raw logs in the format the artifact's dataset was prepared from (``schema.source.format``: ``criteo``,
  ``avazu`` or ``movielens``; a file or a directory), read by the same converter as ``prepare`` (bad
  rows go to ``quarantine.jsonl``, counted in the record) and turned into ids by the same applier of
  the schema's id rules (:class:`~recsys_kd.data.id_rules.IdRules`): ``hash`` (the salted seed is in the
  schema) and ``identity`` need nothing else; ``vocab`` needs the vocabulary files of the prepared
  dataset (``vocab_dir``), which the artifact does not carry.

Outputs under ``out_dir``::

    <split>/part-00000.parquet ...   row_id (int64), probability (float32); for a dataset, part i mirrors
                                     input part i (same rows, order and row groups); for raw logs
                                     (``raw/``), parts of at most ``rows_per_part`` rows in input order
    <split>/part-00000.parquet.json  each part's sidecar: rows, row_id checksum, columns
    quarantine.jsonl                 raw logs only: the refused rows
    score.json                       the record: inputs, parts, rows, rows/s, metrics (AUC, logloss)

Each part is written under a temporary name (:class:`~recsys_kd.data.parts.PartWriter`), and the parts
are renamed into place only once every one is complete and the bad-row check passed; ``score.json`` is
written last. A failed run publishes no part; a rerun removes the temporaries a killed run left
(``<split>/.part-*.tmp``, ``.score.json.*.tmp``), its own output's only.

On N ranks (torchrun / torchx; ``out_dir`` on storage every rank sees) each rank scores its share:
dataset parts dealt by rows (:func:`~recsys_kd.data.parts.deal_parts`), each output part mirroring its input as above; raw logs in the byte ranges
``prepare`` would deal (:func:`~recsys_kd.data.sections.placed_sections`: same row_ids), each rank's
parts named in rank order when published, so in input order. The bad-row check and the metrics are
over all ranks' rows (the AUC histograms and row counts summed exactly, the logloss sums in float64),
each step ends with every rank's verdict (a failure anywhere withdraws every rank's parts), and rank 0
gathers the quarantines and writes ``score.json`` (``world_size``, each rank's rows and seconds).

Memory is bounded by ``batch_size`` and one row group, never by the data size. AUC and logloss are
streamed (:class:`~recsys_kd.train.metrics.StreamingMetrics`): the AUC from histograms of the
probabilities, with the largest error this can cause stated in the record (``auc_max_error``); the
logloss exact.

Example::

    record = score_dataset("runs/demo/artifacts/dagfm_outer.pt", "runs/demo/data", "runs/demo/scores/test")
    record["metrics"]["auc"], record["rows_per_second"]

Longer than 500 lines because one flow serves two inputs (a dataset split, raw logs) on one rank or N,
with every step's verdict shared; its input readers, batch conversion and publishing steps read best
beside that flow.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from recsys_kd.config import from_dict, to_dict
from recsys_kd.data.id_rules import IdRules, vocab_features
from recsys_kd.data.integrity import verify_dataset_part
from recsys_kd.data.parts import PartWriter, deal_parts, part_schema, read_row_group, row_groups
from recsys_kd.data.quarantine import Quarantine, too_many_bad_rows
from recsys_kd.data.schema import ROW_ID, Schema, SchemaError, weight_column
from recsys_kd.data.sections import placed_sections
from recsys_kd.data.source import Section
from recsys_kd.distributed import from_rank, gather_outcome, launched_context, sum_arrays_over_ranks
from recsys_kd.export.artifact import ArtifactError, load_artifact
from recsys_kd.export.serving import example_major_inputs, example_major_weights
from recsys_kd.io import atomic_file, atomic_write_json, naming
from recsys_kd.runs import QUARANTINE_FILE, SCHEMA_FILE, SCORE_RECORD
from recsys_kd.train import hooks
from recsys_kd.train.metrics import StreamingMetrics

RAW_SPLIT = "raw"
PROBABILITY = "probability"
RAW_FORMATS = ("criteo", "avazu", "movielens")
_OUTPUT_SCHEMA = part_schema([PROBABILITY])
# what killed runs leave: PartWriter's and atomic_write_json's temporaries
_STALE_PARTS = re.compile(r"\.part-(r\d+-)?\d+\.parquet(\.json)?\..+\.tmp")  # r: a rank's raw part
_STALE_RECORD = re.compile(rf"\.{re.escape(SCORE_RECORD)}\..+\.tmp")


@dataclass
class _Chunk:
    """Rows to score, as a table with the prepared-dataset columns (row_id, label, dense, sparse ids)."""

    table: pa.Table
    part: str  # output part, relative to out_dir
    row_group: int  # output row group within the part
    origin: str  # the input file, for error messages
    progress: int  # progress-bar units this chunk covers


@dataclass
class _Input:
    """What a run scores: its chunks in output order, the progress total and unit, the record's
    description of the input, and (raw logs) the quarantine of refused rows."""

    chunks: Iterator[_Chunk]
    split: str  # the output split
    total: int
    unit: str
    described: Dict[str, Any]
    quarantine: Optional[Quarantine] = None


def score_dataset(
    artifact: Union[str, Path],
    source: Union[str, Path],
    out_dir: Union[str, Path],
    split: str = "test",
    batch_size: int = 4096,
    vocab_dir: Optional[Union[str, Path]] = None,
    max_bad_fraction: Optional[float] = 0.01,
    rows_per_part: int = 4_194_304,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = True,
) -> Dict[str, Any]:
    """
    Scores every row of a dataset split (or of raw logs) with an artifact; see the module docstring.

    Args:
        artifact: the serving artifact (``recsys-kd export``).
        source: a prepared dataset directory, or raw logs (a file or a directory of files).
        out_dir: where the predictions and ``score.json`` go.
        split: the dataset split to score (ignored for raw logs, whose output split is ``raw``).
        batch_size: rows per forward call (a batch never spans row groups). Larger is not faster: past a
            few thousand rows the heads' activations leave the CPU caches (DAGFM-outer at 1 thread:
            ~40k rows/s at 4096, ~20k at 16384).
        vocab_dir: the prepared dataset holding ``vocab/<feature>.parquet``, for raw logs of a dataset
            with vocabulary ids.
        max_bad_fraction: raw logs: fail when more than this share of rows is refused (None: never).
        rows_per_part: raw logs: rows per output part.
        overwrite: replace an earlier run's output in ``out_dir``.
        progress: show a progress bar.
        verify: check the artifact against the checksum in its export record, and a dataset's parts
            against the checksums in its ``schema.json``, before scoring.

    Returns:
        Dict[str, Any]: the record written to ``out_dir/score.json``.

    Raises:
        ArtifactError: not an artifact, or raw logs that cannot be turned into ids (no format, no
            vocabulary).
        SchemaError: the dataset's features differ from the artifact's, or an id is out of range (names
            the file and row_id), or a part is damaged (its checksum differs).
        FileExistsError: ``out_dir`` holds a finished run and ``overwrite`` is False.
    """
    started = time.perf_counter()
    artifact, source, out_dir = Path(artifact), Path(source), Path(out_dir)
    ranks = launched_context()
    from_rank(0, lambda: _clear_output(artifact, source, out_dir, batch_size, overwrite))
    # each step's failure on any rank fails every rank there (gather_outcome), none waits for another
    loaded: Dict[str, Any] = {}
    gather_outcome(lambda: loaded.update(_opened(artifact, source, split, vocab_dir, verify, ranks.rank, ranks.world_size)))
    module, metadata, schema = loaded["module"], loaded["metadata"], loaded["schema"]
    if "raw_source" in loaded:
        sections = placed_sections(loaded["raw_source"], ranks.rank, ranks.world_size) if ranks.world_size > 1 else None
        gather_outcome(lambda: loaded.update(input=_raw_input(loaded["raw_source"], loaded["rules"], sections, source,
                                                              out_dir, vocab_dir, rows_per_part, ranks.rank, ranks.world_size)))
    scored = loaded["input"]
    metrics = StreamingMetrics()
    writers: List[PartWriter] = []
    try:
        counted = gather_outcome(lambda: _scored_here(module, schema, scored, out_dir, batch_size, metrics, progress,
                                                        writers, ranks.rank, started))
        rows = sum(c["rows"] for c in counted)
        quarantined = _summed([c["quarantined"] for c in counted])
        if scored.quarantine is not None:
            _check_bad_rows(quarantined, rows, max_bad_fraction, out_dir, ranks.rank, ranks.world_size)
        parts = _in_input_order(gather_outcome(lambda: _published(writers, scored, out_dir, counted, ranks.rank)),
                                scored.split == RAW_SPLIT)
    except BaseException as error:
        for writer in writers:
            writer.withdraw()
        if isinstance(error, OSError) and naming(error, out_dir) is not error:
            raise naming(error, out_dir) from error
        raise
    metrics.positives, metrics.negatives, metric_rows, loss_sum = sum_arrays_over_ranks(
        [metrics.positives, metrics.negatives, np.array([metrics.rows], np.int64), np.array([metrics.loss_sum])])
    metrics.rows, metrics.loss_sum = int(metric_rows[0]), float(loss_sum[0])
    record = {
        "stage": "score",
        "artifact": str(artifact),
        "model": metadata["model"]["model"],
        "storage_dtype": metadata["model"]["storage_dtype"],
        "input": scored.described,
        "output": str(out_dir),
        "split": scored.split,
        "parts": parts,
        "rows": rows,
        "quarantined": quarantined if scored.quarantine is not None else {},
        "metrics": metrics.result(),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "world_size": ranks.world_size,
        "ranks": [{"rank": rank, "rows": c["rows"], "seconds": c["seconds"]} for rank, c in enumerate(counted)],
    }
    return from_rank(0, lambda: _write_record(record, out_dir, scored, ranks.world_size, started))


def _clear_output(artifact: Path, source: Path, out_dir: Path, batch_size: int, overwrite: bool) -> None:
    """Rank 0, before any rank writes: the arguments checked; what killed runs left removed, and the old
    record (an interrupted rerun must not leave it claiming parts this run replaced)."""
    _check_arguments(artifact, source, out_dir, batch_size, overwrite)
    remove_stale_temporaries(out_dir)
    (out_dir / SCORE_RECORD).unlink(missing_ok=True)


def _opened(artifact: Path, source: Path, split: str, vocab_dir: Optional[Union[str, Path]], verify: bool, rank: int,
            world_size: int) -> Dict[str, Any]:
    """The artifact's module, metadata and schema; and this rank's dataset ``input``, or the ``raw_source``
    and its id ``rules``."""
    module, metadata = load_artifact(artifact, verify=verify)
    schema = from_dict(Schema, metadata["schema"], source=f"{artifact}:schema.json")
    opened = {"module": module, "metadata": metadata, "schema": schema}
    if (source / SCHEMA_FILE).exists():
        return {**opened, "input": _dataset_input(schema, source, split, verify, rank, world_size)}
    return {**opened, "raw_source": _open_raw(schema, source), "rules": _id_rules(schema, vocab_dir)}


def _scored_here(module, schema: Schema, scored: "_Input", out_dir: Path, batch_size: int, metrics: StreamingMetrics,
                 progress: bool, writers: List[PartWriter], rank: int, started: float) -> Dict[str, Any]:
    """This rank's share scored into finished, unpublished parts; what the other ranks need to know."""
    _score(module, schema, scored, out_dir, batch_size, metrics, progress and rank == 0, writers, rank)
    return {"rows": sum(writer.rows for writer in writers), "parts": len(writers),
            "quarantined": scored.quarantine.summary() if scored.quarantine is not None else {},
            "seconds": round(time.perf_counter() - started, 3)}


def _check_bad_rows(quarantined: Dict[str, int], rows: int, max_bad_fraction: Optional[float], out_dir: Path,
                    rank: int, world_size: int) -> None:
    """Every rank raises TooManyBadRows when too large a share of all ranks' rows was refused (the same
    verdict everywhere); rank 0 first gathers the ranks' quarantines into ``quarantine.jsonl``."""
    error = too_many_bad_rows(quarantined, rows + sum(quarantined.values()), max_bad_fraction, out_dir / QUARANTINE_FILE)
    if error is not None:
        if rank == 0:
            _merge_quarantines(out_dir, world_size)
        raise error


def _published(writers: List[PartWriter], scored: "_Input", out_dir: Path, counted: List[Dict[str, Any]],
               rank: int) -> List[Dict[str, Any]]:
    """Publishes this rank's parts. Raw logs: on N ranks each rank numbered its parts on its own
    (``raw/part-rRRRRR-KKKKK``); they are named here in rank order, so in input order."""
    if scored.split == RAW_SPLIT and len(counted) > 1:
        first = sum(c["parts"] for c in counted[:rank])
        for index, writer in enumerate(writers):
            writer.final = out_dir / _raw_part(first + index)
    return [writer.publish() for writer in writers]


def _in_input_order(parts: List[List[Dict[str, Any]]], raw: bool) -> List[Dict[str, Any]]:
    """Every rank's published parts in input order: raw logs' rank after rank; a dataset's by name (each
    mirrors its input part's zero-padded ``part-NNNNN`` name; :func:`deal_parts` dealt them by rows)."""
    if raw:
        return [part for rank_parts in parts for part in rank_parts]
    return sorted((part for rank_parts in parts for part in rank_parts), key=lambda part: str(part["path"]))


def _write_record(record: Dict[str, Any], out_dir: Path, scored: "_Input", world_size: int, started: float) -> Dict[str, Any]:
    if scored.quarantine is not None and world_size > 1:
        _merge_quarantines(out_dir, world_size)
    seconds = time.perf_counter() - started
    record.update(seconds=round(seconds, 3), rows_per_second=round(record["rows"] / max(seconds, 1e-9), 1))
    atomic_write_json(out_dir / SCORE_RECORD, record)
    return record


def _quarantine_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """Where a rank writes the raw rows it refused: ``quarantine.jsonl`` alone, else its own part of it."""
    return out_dir / (QUARANTINE_FILE if world_size == 1 else f".{QUARANTINE_FILE}.rank-{rank:05d}")


def _merge_quarantines(out_dir: Path, world_size: int) -> None:
    """N ranks: their quarantines, in rank order (so in input order), as ``quarantine.jsonl``."""
    if world_size == 1:
        return
    with atomic_file(out_dir / QUARANTINE_FILE) as temp, open(temp, "wb") as merged:
        for rank in range(world_size):
            part = _quarantine_path(out_dir, rank, world_size)
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, merged)
            part.unlink()


def _summed(counts: List[Dict[str, int]]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def remove_stale_temporaries(out_dir: Path) -> None:
    """Removes what killed runs into ``out_dir`` left: part and record temporaries, nothing else."""
    if not out_dir.is_dir():
        return
    for directory in (out_dir, *(path for path in out_dir.iterdir() if path.is_dir() and not path.is_symlink())):
        for path in directory.iterdir():
            pattern = _STALE_RECORD if directory == out_dir else _STALE_PARTS
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def _check_arguments(artifact: Path, source: Path, out_dir: Path, batch_size: int, overwrite: bool) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} not found")
    if not source.exists():
        raise FileNotFoundError(f"input {source} not found")
    if (out_dir / SCORE_RECORD).exists() and not overwrite:
        raise FileExistsError(f"{out_dir / SCORE_RECORD} exists (a finished score run); pass overwrite to replace it")


def _dataset_input(schema: Schema, dataset: Path, split: str, verify: bool = True, rank: int = 0,
                   world_size: int = 1) -> _Input:
    """A prepared dataset's split, checked against the artifact's features; this rank's parts (dealt by
    rows, :func:`~recsys_kd.data.parts.deal_parts`), checked against their checksums with ``verify``."""
    dataset_schema = Schema.load(dataset)
    check_same_features(schema, dataset_schema, dataset)
    files = dataset_schema.split(split).files
    if world_size > 1:
        dealt = deal_parts([pq.ParquetFile(dataset / relative).metadata.num_rows for relative in files], world_size)
        files = [files[index] for index in dealt[rank]]
    for relative in files if verify else ():
        verify_dataset_part(dataset, split, dataset_schema.split(split), relative)
    rows = dataset_schema.split(split).rows if world_size == 1 else sum(pq.ParquetFile(dataset / f).metadata.num_rows for f in files)
    return _Input(_dataset_chunks(dataset, dataset_schema, files), split, rows, "row",
                  {"kind": "dataset", "path": str(dataset), "split": split})


def _raw_input(raw_source, rules: IdRules, sections: Optional[List[Section]], source: Path, out_dir: Path,
               vocab_dir: Optional[Union[str, Path]], rows_per_part: int, rank: int = 0, world_size: int = 1) -> _Input:
    """Raw logs (this rank's ``sections`` of them, or all), read by the converter of the artifact's
    dataset format and given ids by its id ``rules``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine = Quarantine(_quarantine_path(out_dir, rank, world_size))
    described = {"kind": "raw", "path": str(source), "format": raw_source.info.name, "files": raw_source.info.inputs,
                 "vocab_dir": str(vocab_dir) if vocab_dir else None}
    total = raw_source.progress_total() if sections is None else sum(section.size for section in sections)
    part_name = _raw_part if world_size == 1 else lambda part: f"{RAW_SPLIT}/part-r{rank:05d}-{part:05d}.parquet"
    return _Input(_raw_chunks(raw_source, sections, rules, quarantine, rows_per_part, part_name), RAW_SPLIT, total,
                  "B", described, quarantine)


def _score(
    module: Any,
    schema: Schema,
    scored: _Input,
    out_dir: Path,
    batch_size: int,
    metrics: StreamingMetrics,
    progress: bool,
    writers: List[PartWriter],
    rank: int = 0,
) -> None:
    """Scores the input's chunks in batches of at most ``batch_size`` rows, writing each output part as
    its chunks come; appends the parts' writers to ``writers``, each part finished but not published
    (the caller publishes them, or withdraws them on failure)."""
    sparse_limits = np.array([f.num_embeddings for f in schema.sparse], dtype=np.int64)
    bar = tqdm(total=scored.total, desc=f"score {scored.split}", unit=scored.unit, unit_scale=True,
               disable=not progress, mininterval=1.0)
    try:
        for chunk in scored.chunks:
            if not writers or writers[-1].final != out_dir / chunk.part:
                if writers:
                    writers[-1].finish()
                hooks.reached("score_part", rank, len(writers) + 1)
                writers.append(PartWriter(out_dir / chunk.part, _OUTPUT_SCHEMA))
            for start in range(0, chunk.table.num_rows, batch_size):
                row_ids, labels, inputs = batch_inputs(chunk.table.slice(start, batch_size), schema, sparse_limits,
                                                       chunk.origin)
                with torch.no_grad():
                    probabilities = module(*inputs).numpy()
                writers[-1].add(chunk.row_group, row_ids, probabilities.reshape(-1, 1))
                metrics.update(labels, probabilities)
            bar.update(chunk.progress)
        if writers:
            writers[-1].finish()
    finally:
        bar.close()
        if scored.quarantine is not None:
            scored.quarantine.close()


# ------------------------------------------------------------------------------------------ inputs


def check_same_features(artifact_schema: Schema, dataset_schema: Schema, dataset: Path) -> None:
    """Raises SchemaError naming the first feature where the dataset differs from the artifact's schema
    (dense columns, sparse names and order, ``num_embeddings``, id rules, multi-hot, weighted)."""
    where = f"{dataset / SCHEMA_FILE}"
    if dataset_schema.dense != artifact_schema.dense:
        raise SchemaError(f"{where}: dense columns {dataset_schema.dense} differ from the artifact's {artifact_schema.dense}")
    missing = [name for name in artifact_schema.sparse_names if name not in dataset_schema.sparse_names]
    if missing:
        raise SchemaError(f"{where}: no feature {missing[0]!r}, which the artifact was trained with"
                          + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if dataset_schema.sparse_names != artifact_schema.sparse_names:
        raise SchemaError(
            f"{where}: sparse features {dataset_schema.sparse_names} differ from the artifact's "
            f"{artifact_schema.sparse_names} (names and order must match)"
        )
    for ours, theirs in zip(artifact_schema.sparse, dataset_schema.sparse):
        for key in ("num_embeddings", "id_rule", "multi_hot", "weighted"):
            expected, got = getattr(ours, key), getattr(theirs, key)
            if expected != got:
                if key == "id_rule":  # as schema.json writes it
                    expected, got = to_dict(expected), to_dict(got)
                raise SchemaError(f"{where}: feature {ours.name!r} has {key} {got}, the artifact was trained with {expected}")


def batch_inputs(
    table: pa.Table, schema: Schema, sparse_limits: np.ndarray, origin: str
) -> Tuple[np.ndarray, Optional[np.ndarray], Tuple[torch.Tensor, ...]]:
    """
    One batch of prepared-dataset rows as the artifact's inputs.

    Args:
        table (pa.Table): B rows with ``row_id``, the label (optional), the dense and the sparse columns
            (and the weighted features' weight columns).
        schema (Schema): the artifact's schema (feature order).
        sparse_limits (np.ndarray): ``num_embeddings`` per sparse feature, schema order.
        origin (str): the input file, named in errors.

    Returns:
        (row_ids [B] int64, labels [B] float32 or None, (dense [B, n_dense] float32, ids [N] int64,
        offsets [B * F + 1] int64, and for a weighted schema weights [N] float32) example-major).

    Raises:
        SchemaError: a null value, or an id outside ``[0, num_embeddings)`` (names feature, id, row_id).
    """
    size = table.num_rows
    row_ids = _numpy(table, ROW_ID, origin).astype(np.int64, copy=False)
    labels = _numpy(table, schema.label, origin).astype(np.float32) if schema.label in table.column_names else None
    dense = np.empty((size, len(schema.dense)), dtype=np.float32)
    for j, name in enumerate(schema.dense):
        dense[:, j] = _numpy(table, name, origin)
    values, lengths, weights = [], [], []
    for f, feature in enumerate(schema.sparse):
        column = table.column(feature.name)
        if feature.multi_hot:
            array = column.combine_chunks()
            flat = array.flatten()
            if array.null_count or flat.null_count:
                raise SchemaError(f"{origin}: feature {feature.name!r} has null lists or ids")
            ids = flat.to_numpy().astype(np.int64, copy=False)
            offsets = array.offsets.to_numpy()
            length = np.diff(offsets).astype(np.int64)
        else:
            ids = _numpy(table, feature.name, origin).astype(np.int64, copy=False)
            length = np.ones(size, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= sparse_limits[f]):
            position = int(np.flatnonzero((ids < 0) | (ids >= sparse_limits[f]))[0])
            row = position if not feature.multi_hot else int(np.searchsorted(np.cumsum(length), position, side="right"))
            raise SchemaError(
                f"{origin}: feature {feature.name!r} has id {int(ids[position])} at row_id {int(row_ids[row])}, "
                f"outside [0, {int(sparse_limits[f])}) (num_embeddings of the artifact's table)"
            )
        values.append(ids)
        lengths.append(length)
        if schema.weighted:
            weights.append(_weights(table, feature.name, origin, ids.size) if feature.weighted
                           else np.ones(ids.size, dtype=np.float32))
    if all(not feature.multi_hot for feature in schema.sparse):  # the [B, F] id matrix, row by row
        ids = torch.from_numpy(np.ascontiguousarray(np.stack(values, axis=1)).reshape(-1))
        offsets = torch.arange(size * len(values) + 1, dtype=torch.int64)
    else:
        ids, offsets = example_major_inputs(
            torch.from_numpy(np.concatenate(values)), torch.from_numpy(np.concatenate(lengths)), size, len(values)
        )
    if not schema.weighted:
        return row_ids, labels, (torch.from_numpy(dense), ids, offsets)
    example_weights = example_major_weights(torch.from_numpy(np.concatenate(weights)),
                                            torch.from_numpy(np.concatenate(lengths)), size, len(values))
    return row_ids, labels, (torch.from_numpy(dense), ids, offsets, example_weights)


def _weights(table: pa.Table, feature: str, origin: str, count: int) -> np.ndarray:
    """Weighted feature ``feature``'s weights [count] float32 (flattened when multi-hot), as many as its ids."""
    name = weight_column(feature)
    if name not in table.column_names:
        raise SchemaError(f"{origin}: column {name!r} missing")
    column = table.column(name).combine_chunks()
    flat = column.flatten() if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) else column
    if column.null_count or flat.null_count or len(flat) != count:
        raise SchemaError(f"{origin}: column {name!r} has null weights or not one weight per id of {feature!r}")
    return flat.to_numpy().astype(np.float32, copy=False)


def _numpy(table: pa.Table, name: str, origin: str) -> np.ndarray:
    if name not in table.column_names:
        raise SchemaError(f"{origin}: column {name!r} missing")
    column = table.column(name)
    if column.null_count:
        raise SchemaError(f"{origin}: column {name!r} has {column.null_count} null values")
    return column.to_numpy()


def _dataset_chunks(dataset: Path, schema: Schema, files: List[str]) -> Iterator[_Chunk]:
    """The row groups of the split's parts ``files``, in order, each as the output part that mirrors
    its input part."""
    columns = [ROW_ID, schema.label, *schema.dense, *schema.sparse_names, *schema.weight_columns]
    for relative in files:
        path = dataset / relative
        for group in range(row_groups(path)):
            table = read_row_group(path, group, columns)
            yield _Chunk(table, relative, group, str(path), table.num_rows)


# -------------------------------------------------------------------------------------- raw logs


def _open_raw(schema: Schema, source: Path):
    """The converter that reads raw logs of the artifact's dataset format."""
    from recsys_kd.data.criteo import CriteoOptions
    from recsys_kd.data.movielens import GENRES, MovieLensOptions
    from recsys_kd.data.prepare import PrepareConfig, open_source

    raw_format = schema.source.get("format", "")
    if raw_format not in RAW_FORMATS:
        raise ArtifactError(
            f"{source}: not a prepared dataset (no {SCHEMA_FILE}), and the artifact's dataset was made from "
            f"format {raw_format!r}, which has no raw-log form; raw logs can be scored for {list(RAW_FORMATS)}"
        )
    integers = "bucketize" if "I1" in schema.sparse_names else "log"  # how prepare treated Criteo's I1..I13
    genres = MovieLensOptions(genres=GENRES in schema.sparse_names)  # whether prepare added MovieLens genres
    return open_source(PrepareConfig(format=raw_format, inputs=[str(source)], criteo=CriteoOptions(integers=integers),
                                     movielens=genres))


def _id_rules(schema: Schema, vocab_dir: Optional[Union[str, Path]]) -> IdRules:
    """The artifact's id rules, with the vocabularies of ``vocab_dir`` for its vocabulary features.

    Raises:
        ArtifactError: a vocabulary feature and no ``vocab_dir``, or its vocabulary missing or of
            another size than the artifact's table.
    """
    needs_vocab = vocab_features(schema)
    if needs_vocab and vocab_dir is None:
        named = ", ".join(needs_vocab[:3]) + (f" and {len(needs_vocab) - 3} more" if len(needs_vocab) > 3 else "")
        raise ArtifactError(
            f"features {named} have vocabulary ids, and the artifact does not carry the vocabularies: "
            "pass the prepared dataset's directory (vocab_dir / --vocab), which holds vocab/<feature>.parquet"
        )
    try:
        return IdRules.load(schema, vocab_dir)
    except SchemaError as error:
        raise ArtifactError(str(error)) from None


def _raw_part(part: int) -> str:
    return f"{RAW_SPLIT}/part-{part:05d}.parquet"


def _raw_chunks(raw_source, sections: Optional[List[Section]], rules: IdRules, quarantine: Quarantine,
                rows_per_part: int, part_name: Callable[[int], str]) -> Iterator[_Chunk]:
    """The converter's chunks (of ``sections``, or all) as id tables, cut into output parts of at most
    ``rows_per_part`` rows, part k at ``part_name(k)``."""
    part, rows_in_part, group = 0, 0, 0
    origin = ", ".join(raw_source.info.inputs)
    chunks = raw_source.chunks(quarantine) if sections is None else raw_source.chunks(quarantine, sections)
    for chunk in chunks:
        table = rules.apply(chunk.table)
        while table.num_rows:
            if rows_in_part >= rows_per_part:
                part, rows_in_part, group = part + 1, 0, 0
            take = min(table.num_rows, rows_per_part - rows_in_part)
            piece, table = table.slice(0, take), table.slice(take)
            yield _Chunk(piece, part_name(part), group, origin, chunk.progress if not table.num_rows else 0)
            rows_in_part += take
            group += 1
