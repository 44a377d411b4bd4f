"""Writes one split of a dataset as Parquet parts with bounded row groups, and each part's checksum."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_kd.data.integrity import file_checksum


class SplitWriter:
    """Appends tables to ``<directory>/<split>/part-NNNNN.parquet``; a row group is written every
    ``row_group_rows`` rows and a new part started every ``rows_per_part`` rows, so memory stays
    bounded by one row group. The directory is expected to be a staged (temporary) one. When a part is
    closed its checksum is taken (:func:`~recsys_kd.data.integrity.file_checksum`) for ``schema.json``.

    Example::

        writer = SplitWriter(staging, "train", arrow_schema, row_group_rows=65536)
        writer.write(table)
        writer.close()
        writer.files, writer.rows, writer.checksums   # checksums: {relative file: "crc32:<hex>"}
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        schema: pa.Schema,
        row_group_rows: int = 65536,
        rows_per_part: int = 4_194_304,
        compression: str = "zstd",
    ) -> None:
        self.directory = Path(directory)
        self.split = split
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.rows_per_part = max(rows_per_part, row_group_rows)
        self.compression = compression
        self.files: List[str] = []
        self.checksums: Dict[str, str] = {}
        self.rows = 0
        self.positives = 0
        self._pending: List[pa.Table] = []
        self._pending_rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._part_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def close(self) -> None:
        while self._pending_rows:
            self._flush(min(self._pending_rows, self.row_group_rows))
        self._close_part()

    def _flush(self, rows: int) -> None:
        merged = pa.concat_tables(self._pending)
        group, rest = merged.slice(0, rows), merged.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None or self._part_rows + rows > self.rows_per_part:
            self._open_part()
        self._writer.write_table(group, row_group_size=rows)
        self._part_rows += rows
        self.rows += rows
        self.positives += int(pc.sum(group.column("label")).as_py() or 0)

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            relative = self.files[-1]
            self.checksums[relative] = file_checksum(self.directory / relative)

    def _open_part(self) -> None:
        self._close_part()
        relative = f"{self.split}/part-{len(self.files):05d}.parquet"
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, self.schema, compression=self.compression)
        self.files.append(relative)
        self._part_rows = 0
