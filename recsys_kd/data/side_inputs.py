"""Side inputs: directories of per-row columns aligned with a prepared dataset (``infer``'s soft labels).

A side input mirrors the dataset: for every dataset part ``<split>/part-NNNNN.parquet`` it holds a part
of the same name with the same rows, order and row groups, columns ``row_id`` and its own (float32
scalars, fixed-size list<float32> vectors), each published with a sidecar (:mod:`recsys_kd.data.parts`).
Its manifest ``side.json`` names them::

    {"dataset": "runs/demo/data", "columns": ["teacher_dcn"], "vectors": {"hint_dcn": 64},
     "splits": {"train": {"files": ["train/part-00000.parquet"], "rows": 1000}, ...}}

Alignment is checked, never assumed: :func:`verify_alignment` compares every part's row count and
row_id checksum with the dataset's before a run starts, and the reader compares row_ids row group by
row group as it joins the columns (:func:`join_side_columns`). Integrity too: with ``verify``, every
part is checked against the file checksum in its sidecar (:func:`~recsys_kd.data.parts.verify_part`,
once per process and file) before it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.integrity import RERUN_INFER, verify_dataset_part
from recsys_kd.data.parts import RowIdDigest, read_row_group, verify_part
from recsys_kd.data.schema import ROW_ID, Schema, SchemaError
from recsys_kd.runs import SIDE_INPUT_FILE


def read_manifest(side: Union[str, Path]) -> Dict[str, Any]:
    """A side input's ``side.json``; SchemaError when it is missing (written last, so an unfinished
    infer run has none)."""
    path = Path(side) / SIDE_INPUT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SchemaError(f"{path} missing or incomplete: {side} is not a finished side input (infer output); "
                          "rerun infer to finish it") from None


def side_columns(
    side_inputs: Sequence[Union[str, Path]], schema: Schema, split: str, files: List[str], verify: bool = True
) -> Tuple[Dict[str, Path], Dict[str, int]]:
    """(column -> side-input directory, vector column -> width H) of the side inputs of a dataset with
    ``schema``, whose split ``split`` has parts ``files``. Raises SchemaError when a side input does not
    mirror those parts, its columns clash with the dataset's or another side input's, or (``verify``)
    one of its parts of ``split`` differs from the checksum in its sidecar."""
    columns: Dict[str, Path] = {}
    widths: Dict[str, int] = {}
    for side in side_inputs:
        side = Path(side)
        manifest_path = side / SIDE_INPUT_FILE
        manifest = read_manifest(side)
        parts = manifest["splits"].get(split, {}).get("files")
        if parts != files:
            raise SchemaError(f"{manifest_path}: split {split!r} parts {parts} do not mirror the dataset's {files}")
        for relative in files if verify else ():
            verify_part(side / relative, RERUN_INFER)
        vectors = manifest.get("vectors", {})
        for name in [*manifest["columns"], *vectors]:
            if name in schema.columns() or name in columns:
                raise SchemaError(f"{manifest_path}: column {name!r} already exists in the dataset or another side input")
            columns[name] = side
        for name, width in vectors.items():
            if not isinstance(width, int) or width < 1:
                raise SchemaError(f"{manifest_path}: vector column {name!r} has width {width!r}, expected an int >= 1")
            widths[name] = width
    return columns, widths


def join_side_columns(
    table: pa.Table, columns: Dict[str, Path], wanted: Sequence[str], split: str, path: Path, row_group: int,
    verify: bool = True,
) -> pa.Table:
    """``table`` (row group ``row_group`` of the dataset part ``path``) with the ``wanted`` columns that
    live in side inputs (``columns``: column -> side-input directory) appended. Their row_ids must equal
    the dataset's, row for row, and (``verify``) their parts their sidecars' checksums: SchemaError
    otherwise."""
    by_side: Dict[Path, List[str]] = {}
    for name in wanted:
        if name in columns:
            by_side.setdefault(columns[name], []).append(name)
    for side_dir, names in by_side.items():
        side_path = side_dir / split / path.name
        if verify:
            verify_part(side_path, RERUN_INFER)
        side = read_row_group(side_path, row_group, [ROW_ID, *names])  # SchemaError if missing or corrupt
        if side.num_rows != table.num_rows or not np.array_equal(
            side.column(ROW_ID).to_numpy(), table.column(ROW_ID).to_numpy()
        ):
            raise SchemaError(
                f"{side_path} row group {row_group} is not aligned with {path}: "
                f"{side.num_rows} rows vs {table.num_rows}, or different row_ids"
            )
        for name in names:
            table = table.append_column(name, side.column(name))
    return table


def verify_alignment(dataset: Path, side: Path, splits: Optional[List[str]] = None, verify: bool = True
                     ) -> Dict[str, int]:
    """Checks every part of ``side`` against the dataset's part: row counts and row_id checksums, and
    (``verify``) both parts' file checksums. Raises SchemaError naming the first part that differs;
    returns rows per split."""
    schema = Schema.load(dataset)
    manifest = read_manifest(side)
    checked = {}
    for split in splits or list(manifest["splits"]):
        rows = 0
        for relative in schema.split(split).files:
            if verify:
                verify_dataset_part(dataset, split, schema.split(split), relative)
            expected = verify_part(Path(side) / relative, RERUN_INFER, verify)
            digest = RowIdDigest()  # row group by row group: memory bounded by one group, not the part
            logs = pq.ParquetFile(Path(dataset) / relative)
            for group in range(logs.num_row_groups):
                digest.update(logs.read_row_group(group, columns=[ROW_ID]).column(ROW_ID).to_numpy())
            if expected["row_id_checksum"] != str(digest):
                raise SchemaError(
                    f"{side}/{relative} is not aligned with {dataset}/{relative}: {expected['rows']} rows with "
                    f"checksum {expected['row_id_checksum']}, the logs have {digest.count} rows ({digest})"
                )
            rows += digest.count
        checked[split] = rows
    return checked
