"""Shared test helpers: reading back a prepared dataset in full (small datasets only)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.schema import Schema


def read_split(dataset: Path, split: str) -> pa.Table:
    schema = Schema.load(dataset)
    files = schema.splits[split].files
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(Path(dataset) / f) for f in files])


def read_all(dataset: Path) -> pa.Table:
    schema = Schema.load(dataset)
    tables = [read_split(dataset, s) for s in schema.splits if schema.splits[s].files]
    return pa.concat_tables(tables).sort_by("row_id")
