"""Shared test helpers: reading back a prepared dataset in full (small datasets only)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.schema import IdRule, Schema, SparseFeature

IDENTITY = IdRule(kind="identity")


def tiny_schema(with_hour: bool = True) -> Schema:
    """2 dense features and 3-4 small sparse ones, one multi-hot: for model-level tests."""
    sparse = [
        SparseFeature("user", 11, IDENTITY),
        SparseFeature("tags", 7, IDENTITY, multi_hot=True),
        SparseFeature("item", 13, IDENTITY),
    ]
    if with_hour:
        sparse.append(SparseFeature("hour", 5, IDENTITY))
    return Schema(name="tiny", label="label", dense=["d0", "d1"], sparse=sparse)


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
