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

Memory is bounded by ``batch_size`` and one row group, never by the data size. AUC and logloss are
streamed (:class:`~recsys_kd.train.metrics.StreamingMetrics`): the AUC from histograms of the
probabilities, with the largest error this can cause stated in the record (``auc_max_error``); the
logloss exact.

Example::

    record = score_dataset("runs/demo/artifacts/dagfm_outer.pt", "runs/demo/data", "runs/demo/scores/test")
    record["metrics"]["auc"], record["rows_per_second"]
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from recsys_kd.config import from_dict, to_dict
from recsys_kd.data.id_rules import IdRules, vocab_features
from recsys_kd.data.integrity import verify_dataset_part
from recsys_kd.data.parts import PartWriter, part_schema, read_row_group, row_groups
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.schema import ROW_ID, Schema, SchemaError
from recsys_kd.export.artifact import ArtifactError, load_artifact
from recsys_kd.export.serving import example_major_inputs
from recsys_kd.io import atomic_write_json, naming
from recsys_kd.runs import QUARANTINE_FILE, SCHEMA_FILE, SCORE_RECORD
from recsys_kd.train import hooks
from recsys_kd.train.metrics import StreamingMetrics

RAW_SPLIT = "raw"
PROBABILITY = "probability"
RAW_FORMATS = ("criteo", "avazu", "movielens")
_OUTPUT_SCHEMA = part_schema([PROBABILITY])
# what killed runs leave: PartWriter's and atomic_write_json's temporaries
_STALE_PARTS = re.compile(r"\.part-\d+\.parquet(\.json)?\..+\.tmp")
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
    _check_arguments(artifact, source, out_dir, batch_size, overwrite)
    module, metadata = load_artifact(artifact, verify=verify)
    schema = from_dict(Schema, metadata["schema"], source=f"{artifact}:schema.json")
    remove_stale_temporaries(out_dir)
    # an interrupted rerun must not leave the old record claiming parts this run replaced
    (out_dir / SCORE_RECORD).unlink(missing_ok=True)
    if (source / SCHEMA_FILE).exists():
        scored = _dataset_input(schema, source, split, verify)
    else:
        scored = _raw_input(schema, source, out_dir, vocab_dir, rows_per_part)
    metrics = StreamingMetrics()
    writers: List[PartWriter] = []
    try:
        _score(module, schema, scored, out_dir, batch_size, metrics, progress, writers)
        rows = sum(writer.rows for writer in writers)
        if scored.quarantine is not None:
            scored.quarantine.check(rows + scored.quarantine.total, max_bad_fraction)
        parts = [writer.publish() for writer in writers]
    except BaseException as error:
        for writer in writers:
            writer.withdraw()
        if isinstance(error, OSError) and naming(error, out_dir) is not error:
            raise naming(error, out_dir) from error
        raise
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
        "quarantined": scored.quarantine.summary() if scored.quarantine is not None else {},
        "metrics": metrics.result(),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    seconds = time.perf_counter() - started
    record.update(seconds=round(seconds, 3), rows_per_second=round(rows / max(seconds, 1e-9), 1))
    atomic_write_json(out_dir / SCORE_RECORD, record)
    return record


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


def _dataset_input(schema: Schema, dataset: Path, split: str, verify: bool = True) -> _Input:
    """A prepared dataset's split, checked against the artifact's features (and its parts against their
    checksums, with ``verify``)."""
    dataset_schema = Schema.load(dataset)
    check_same_features(schema, dataset_schema, dataset)
    for relative in dataset_schema.split(split).files if verify else ():
        verify_dataset_part(dataset, split, dataset_schema.split(split), relative)
    return _Input(_dataset_chunks(dataset, dataset_schema, split), split, dataset_schema.split(split).rows, "row",
                  {"kind": "dataset", "path": str(dataset), "split": split})


def _raw_input(schema: Schema, source: Path, out_dir: Path, vocab_dir: Optional[Union[str, Path]],
               rows_per_part: int) -> _Input:
    """Raw logs, read by the converter of the artifact's dataset format and given ids by its id rules."""
    raw_source = _open_raw(schema, source)
    rules = _id_rules(schema, vocab_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine = Quarantine(out_dir / QUARANTINE_FILE)
    described = {"kind": "raw", "path": str(source), "format": raw_source.info.name, "files": raw_source.info.inputs,
                 "vocab_dir": str(vocab_dir) if vocab_dir else None}
    return _Input(_raw_chunks(raw_source, rules, quarantine, rows_per_part), RAW_SPLIT, raw_source.progress_total(),
                  "B", described, quarantine)


def _score(
    module: torch.jit.ScriptModule,
    schema: Schema,
    scored: _Input,
    out_dir: Path,
    batch_size: int,
    metrics: StreamingMetrics,
    progress: bool,
    writers: List[PartWriter],
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
                hooks.reached("score_part", 0, len(writers) + 1)
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
    (dense columns, sparse names and order, ``num_embeddings``, id rules, multi-hot)."""
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
        for key in ("num_embeddings", "id_rule", "multi_hot"):
            expected, got = getattr(ours, key), getattr(theirs, key)
            if expected != got:
                if key == "id_rule":  # as schema.json writes it
                    expected, got = to_dict(expected), to_dict(got)
                raise SchemaError(f"{where}: feature {ours.name!r} has {key} {got}, the artifact was trained with {expected}")


def batch_inputs(
    table: pa.Table, schema: Schema, sparse_limits: np.ndarray, origin: str
) -> Tuple[np.ndarray, Optional[np.ndarray], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """
    One batch of prepared-dataset rows as the artifact's inputs.

    Args:
        table (pa.Table): B rows with ``row_id``, the label (optional), the dense and the sparse columns.
        schema (Schema): the artifact's schema (feature order).
        sparse_limits (np.ndarray): ``num_embeddings`` per sparse feature, schema order.
        origin (str): the input file, named in errors.

    Returns:
        (row_ids [B] int64, labels [B] float32 or None, (dense [B, n_dense] float32, ids [N] int64,
        offsets [B * F + 1] int64) example-major).

    Raises:
        SchemaError: a null value, or an id outside ``[0, num_embeddings)`` (names feature, id, row_id).
    """
    size = table.num_rows
    row_ids = _numpy(table, ROW_ID, origin).astype(np.int64, copy=False)
    labels = _numpy(table, schema.label, origin).astype(np.float32) if schema.label in table.column_names else None
    dense = np.empty((size, len(schema.dense)), dtype=np.float32)
    for j, name in enumerate(schema.dense):
        dense[:, j] = _numpy(table, name, origin)
    values, lengths = [], []
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
    if all(not feature.multi_hot for feature in schema.sparse):  # the [B, F] id matrix, row by row
        ids = torch.from_numpy(np.ascontiguousarray(np.stack(values, axis=1)).reshape(-1))
        offsets = torch.arange(size * len(values) + 1, dtype=torch.int64)
    else:
        ids, offsets = example_major_inputs(
            torch.from_numpy(np.concatenate(values)), torch.from_numpy(np.concatenate(lengths)), size, len(values)
        )
    return row_ids, labels, (torch.from_numpy(dense), ids, offsets)


def _numpy(table: pa.Table, name: str, origin: str) -> np.ndarray:
    if name not in table.column_names:
        raise SchemaError(f"{origin}: column {name!r} missing")
    column = table.column(name)
    if column.null_count:
        raise SchemaError(f"{origin}: column {name!r} has {column.null_count} null values")
    return column.to_numpy()


def _dataset_chunks(dataset: Path, schema: Schema, split: str) -> Iterator[_Chunk]:
    """The split's row groups in order, each as the output part that mirrors its input part."""
    columns = [ROW_ID, schema.label, *schema.dense, *schema.sparse_names]
    for relative in schema.split(split).files:
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


def _raw_chunks(raw_source, rules: IdRules, quarantine: Quarantine, rows_per_part: int) -> Iterator[_Chunk]:
    """The converter's chunks as id tables, cut into output parts of at most ``rows_per_part`` rows."""
    part, rows_in_part, group = 0, 0, 0
    origin = ", ".join(raw_source.info.inputs)
    for chunk in raw_source.chunks(quarantine):
        table = rules.apply(chunk.table)
        while table.num_rows:
            if rows_in_part >= rows_per_part:
                part, rows_in_part, group = part + 1, 0, 0
            take = min(table.num_rows, rows_per_part - rows_in_part)
            piece, table = table.slice(0, take), table.slice(take)
            yield _Chunk(piece, f"{RAW_SPLIT}/part-{part:05d}.parquet", group, origin, chunk.progress if not table.num_rows else 0)
            rows_in_part += take
            group += 1
