"""Output parts that mirror an input part, row group for row group: what ``infer`` (teacher logits and
hint vectors) and ``score`` (probabilities) write per part of a split.

A part holds ``row_id`` (int64) and the caller's columns: float32 scalars and fixed-size list<float32>
vectors. :class:`PartWriter` starts a new row group whenever the caller's input row group changes, so
the output's row groups are the input's; it writes under a temporary name (``.<name>.<pid>.tmp``),
renames the part into place when complete, and then writes its sidecar ``<part>.json``::

    {"rows": 4096, "row_id_checksum": "4096:8386560:5f1c...", "columns": ["teacher_dcn", "hint_dcn"],
     "checksum": "crc32:1a2b3c4d"}

A part without its sidecar is unfinished (:func:`part_complete`); the row_id checksum lets a reader
check that a part holds the same rows as the part it mirrors without comparing them one by one, and
``checksum``, the part file's own (:mod:`recsys_kd.data.integrity`), that its bytes are those written.
:func:`part_complete` verifies it, so a damaged part counts as unfinished and is redone.

A caller that publishes a run's parts only once all are written (``score``) calls
:meth:`PartWriter.finish` on each as it completes and :meth:`PartWriter.publish` at the end.

:func:`read_row_group` reads one row group of any Parquet file, a truncated or corrupt file being a
``SchemaError`` that names it.

Example::

    writer = PartWriter(out / "test/part-00000.parquet", part_schema(["probability"]))
    writer.add(row_group, row_ids, probabilities.reshape(-1, 1))
    writer.close()   # {"path": ..., "rows": ...}
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.ids import splitmix64
from recsys_kd.data.integrity import ChecksumError, file_checksum, verify_file, warn, warn_unverifiable
from recsys_kd.data.schema import ROW_ID, SchemaError
from recsys_kd.io import atomic_write_json


def deal_parts(part_rows: Sequence[int], world_size: int) -> List[List[int]]:
    """The parts each rank writes the mirror of: every part to exactly one rank, the rows balanced.

    Largest part first to the rank with the fewest rows so far (ties: the lower rank), each rank's
    parts then in input order; deterministic, so every rank computes the same dealing. Dealing by
    index (part i to rank i mod N) would give one rank the large parts when they alternate with
    small ones, as the parts of an N-rank ``prepare`` do (each rank's full parts, then its tail)::

        deal_parts([4_194_304, 300_000, 4_194_304, 300_000], 2)  # [[0, 1], [2, 3]], not [[0, 2], [1, 3]]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    dealt: List[List[int]] = [[] for _ in range(world_size)]
    for part in sorted(range(len(part_rows)), key=lambda index: (-part_rows[index], index)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        dealt[rank].append(part)
        loads[rank] += part_rows[part]
    return [sorted(parts) for parts in dealt]


def part_schema(columns: Sequence[str] = (), vectors: Optional[Mapping[str, int]] = None) -> pa.Schema:
    """``row_id`` int64, then one float32 column per name in ``columns``, then one
    fixed-size list<float32>[H] column per (name, H) in ``vectors``."""
    return pa.schema([(ROW_ID, pa.int64())] + [(name, pa.float32()) for name in columns]
                     + [(name, pa.list_(pa.float32(), width)) for name, width in (vectors or {}).items()])


def sidecar_path(part: Path) -> Path:
    """The JSON written beside a published part: ``part-00000.parquet`` -> ``part-00000.parquet.json``."""
    part = Path(part)
    return part.with_name(part.name + ".json")


class RowIdDigest:
    """The order-independent digest of row ids (count, sum and xor of their hashes), fed block by block,
    so a part's digest needs no copy of all its ids.

    Example::

        digest = RowIdDigest()
        digest.update(np.arange(4096))
        str(digest)  # "4096:8386560:5f1c...", equal to row_id_checksum(np.arange(4096))
    """

    def __init__(self) -> None:
        self.count, self.total, self.mixed = 0, 0, 0

    def update(self, row_ids: np.ndarray) -> None:
        if len(row_ids):
            ids = row_ids.astype(np.int64, copy=False)
            self.count += len(ids)
            self.total += int(ids.sum())
            self.mixed ^= int(np.bitwise_xor.reduce(splitmix64(ids.view(np.uint64))))

    def __str__(self) -> str:
        return f"{self.count}:{self.total}:{self.mixed:016x}"


def row_id_checksum(row_ids: np.ndarray) -> str:
    """Order-independent digest of a part's row ids (count, sum and xor of their hashes)."""
    digest = RowIdDigest()
    digest.update(row_ids)
    return str(digest)


def read_row_group(path: Path, row_group: int, columns: Sequence[str]) -> pa.Table:
    """Row group ``row_group`` (its ``columns``) of the Parquet file ``path``.

    Raises:
        SchemaError: the file is missing, truncated or corrupt (names it and the row group).
    """
    try:
        with pq.ParquetFile(path) as parquet:
            return parquet.read_row_group(row_group, columns=list(columns))
    except (OSError, pa.ArrowException) as error:
        raise SchemaError(f"{path}: cannot read row group {row_group} (truncated or corrupt Parquet?): "
                          f"{' '.join(str(error).split())}") from error


def row_groups(path: Path) -> int:
    """The number of row groups of the Parquet file ``path``; SchemaError when its footer is unreadable."""
    try:
        return pq.read_metadata(path).num_row_groups
    except (OSError, pa.ArrowException) as error:
        raise SchemaError(f"{path}: cannot read the Parquet footer (truncated or corrupt?): "
                          f"{' '.join(str(error).split())}") from error


def part_complete(part: Path, row_groups: Sequence[int], columns: Sequence[str], verify: bool = True) -> bool:
    """Whether ``part`` was published with these ``columns`` and every row of the input part whose row
    groups have ``row_groups`` rows, and (``verify``) still has the checksum of its sidecar: a damaged
    part is not complete (a warning says so)."""
    sidecar = sidecar_path(part)
    if not (Path(part).exists() and sidecar.exists()):
        return False
    written = json.loads(sidecar.read_text())
    if written["rows"] != sum(row_groups) or written.get("columns") != list(columns):
        return False
    if verify and "checksum" in written:
        try:
            verify_file(part, written["checksum"], "redoing it")
        except ChecksumError as error:
            warn(str(error))
            return False
    return True


def verify_part(part: Path, recover: str, verify: bool = True) -> Dict[str, Any]:
    """Checks a published ``part`` against the checksum in its sidecar (unless not ``verify``) and returns
    the sidecar; ``recover`` ends an error's message.

    Raises:
        SchemaError: no sidecar (the part is unfinished), or the part's bytes differ from its checksum
            (:class:`~recsys_kd.data.integrity.ChecksumError`). A sidecar without a checksum (written by an
            older version) draws a warning instead.
    """
    sidecar = sidecar_path(part)
    try:
        written = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise SchemaError(f"{part} is missing or incomplete (no {sidecar.name}); {recover}") from None
    if not verify:
        pass
    elif "checksum" in written:
        verify_file(part, written["checksum"], recover)
    else:
        warn_unverifiable(Path(part).parent, "its parts (their sidecars have none)", "infer")
    return written


class PartWriter:
    """One output part, written row group by row group and published atomically.

    Args:
        final: the part's path; its directory is created.
        schema: ``row_id`` (int64) first, then float32 and fixed-size list<float32> columns
            (:func:`part_schema` makes one).
        compression: Parquet codec.

    Raises:
        ValueError: a schema of another shape.
    """

    def __init__(self, final: Path, schema: pa.Schema, compression: str = "zstd") -> None:
        self.final = Path(final)
        self.schema = schema
        self.widths = _widths(schema)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.final.with_name(f".{self.final.name}.{os.getpid()}.tmp")
        self.writer = pq.ParquetWriter(self.temp, schema, compression=compression)
        self.group: Optional[int] = None
        self.pending: List[Tuple[np.ndarray, np.ndarray]] = []
        self.rows = 0
        self.row_id_digest = RowIdDigest()
        self.row_id_checksum: Optional[str] = None  # set when finished, with the file's checksum
        self.checksum: Optional[str] = None
        self.published = False

    def add(self, row_group: int, row_ids: np.ndarray, values: np.ndarray) -> None:
        """Appends rows of the input's ``row_group``: ``row_ids [B]`` and ``values [B, C]``, the
        schema's columns after ``row_id`` side by side (a scalar column takes one value, a vector
        column of width H the next H). Both are copied."""
        if values.ndim != 2 or values.shape != (len(row_ids), sum(self.widths)):
            raise ValueError(f"{self.final}: values have shape {values.shape}, expected ({len(row_ids)}, {sum(self.widths)})")
        if self.group is not None and row_group != self.group:
            self._flush()
        self.group = row_group
        self.pending.append((np.array(row_ids, dtype=np.int64), np.array(values, dtype=np.float32)))

    def _flush(self) -> None:
        if not self.pending:
            return
        row_ids = np.concatenate([r for r, _ in self.pending])
        values = np.concatenate([v for _, v in self.pending])
        data: Dict[str, Any] = {ROW_ID: row_ids}
        start = 0
        for field, width in zip(list(self.schema)[1:], self.widths):
            if pa.types.is_fixed_size_list(field.type):
                flat = np.ascontiguousarray(values[:, start:start + width]).reshape(-1)
                data[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
            else:
                data[field.name] = values[:, start]
            start += width
        self.writer.write_table(pa.table(data, schema=self.schema), row_group_size=len(row_ids))
        self.rows += len(row_ids)
        self.row_id_digest.update(row_ids)
        self.pending = []

    def finish(self) -> None:
        """Completes the part under its temporary name; :meth:`publish` renames it into place."""
        if self.row_id_checksum is not None:
            return
        try:
            self._flush()
            self.writer.close()
        except BaseException:
            self.abort()
            raise
        self.row_id_checksum = str(self.row_id_digest)
        self.checksum = file_checksum(self.temp)

    def publish(self) -> Dict[str, Any]:
        """Renames the finished part into place, then writes its sidecar; returns {path, rows}. When the
        sidecar cannot be written the part is withdrawn: nothing is published without it."""
        self.finish()
        sidecar_path(self.final).unlink(missing_ok=True)  # a part replacing an earlier one: its sidecar
        os.replace(self.temp, self.final)
        self.published = True
        try:
            atomic_write_json(sidecar_path(self.final), {"rows": self.rows, "row_id_checksum": self.row_id_checksum,
                                                         "columns": self.schema.names[1:], "checksum": self.checksum})
        except BaseException:
            self.withdraw()
            raise
        return {"path": str(self.final), "rows": self.rows}

    def close(self) -> Dict[str, Any]:
        """Finishes and publishes the part (:meth:`finish`, :meth:`publish`); returns {path, rows}. On
        failure nothing is published."""
        try:
            return self.publish()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drops the unfinished part (nothing appears under the final name)."""
        self.writer.close()
        with contextlib.suppress(OSError):  # a failed cleanup must not hide the error
            self.temp.unlink(missing_ok=True)

    def withdraw(self) -> None:
        """Removes the part this writer published, and its sidecar (a run that failed after publishing)."""
        self.abort()
        if not self.published:
            return
        self.published = False
        for path in (sidecar_path(self.final), self.final):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _widths(schema: pa.Schema) -> List[int]:
    """Values per row of each column after ``row_id``; raises ValueError for a schema of another shape."""
    if not schema.names or schema.names[0] != ROW_ID or schema.field(0).type != pa.int64():
        raise ValueError(f"a part's first column must be {ROW_ID} int64, got {schema}")
    widths = []
    for field in list(schema)[1:]:
        if field.type == pa.float32():
            widths.append(1)
        elif pa.types.is_fixed_size_list(field.type) and field.type.value_type == pa.float32():
            widths.append(field.type.list_size)
        else:
            raise ValueError(f"part column {field.name!r} is {field.type}; float32 or fixed_size_list<float32> expected")
    return widths
