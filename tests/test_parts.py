"""PartWriter: row groups follow the caller's, scalar and fixed-size list columns, atomic publication
with a sidecar (rows, row_id checksum, columns), abort leaves nothing; part_complete reads the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_kd.data.integrity import file_checksum
from recsys_kd.data.parts import PartWriter, RowIdDigest, deal_parts, part_complete, part_schema, row_id_checksum, sidecar_path


def test_a_part_mirrors_row_groups_and_is_published_with_its_sidecar(tmp_path: Path) -> None:
    final = tmp_path / "train" / "part-00000.parquet"
    writer = PartWriter(final, part_schema(["teacher_a", "teacher_b"], {"hint_a": 3}))
    generator = np.random.default_rng(0)
    values = generator.normal(size=(10, 5)).astype(np.float32)
    row_ids = np.arange(100, 110)
    for row_group, rows in ((0, slice(0, 3)), (0, slice(3, 4)), (1, slice(4, 9)), (2, slice(9, 10))):
        writer.add(row_group, row_ids[rows], values[rows])
    assert not final.exists() and not sidecar_path(final).exists()  # nothing published before close
    assert writer.close() == {"path": str(final), "rows": 10}

    parquet = pq.ParquetFile(final)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [4, 5, 1]
    table = parquet.read()
    assert table.schema.field("hint_a").type == pa.list_(pa.float32(), 3)
    assert table.column("row_id").to_pylist() == row_ids.tolist()
    np.testing.assert_array_equal(table.column("teacher_a").to_numpy(), values[:, 0])
    np.testing.assert_array_equal(table.column("teacher_b").to_numpy(), values[:, 1])
    np.testing.assert_array_equal(np.stack(table.column("hint_a").to_numpy(zero_copy_only=False)), values[:, 2:])
    assert json.loads(sidecar_path(final).read_text()) == {
        "rows": 10, "row_id_checksum": row_id_checksum(row_ids), "columns": ["teacher_a", "teacher_b", "hint_a"],
        "checksum": file_checksum(final)}
    assert part_complete(final, [4, 5, 1], ["teacher_a", "teacher_b", "hint_a"])
    assert not part_complete(final, [4, 5, 2], ["teacher_a", "teacher_b", "hint_a"])  # another input part
    assert not part_complete(final, [4, 5, 1], ["teacher_a"])  # written with other columns
    assert not list(tmp_path.rglob("*.tmp"))


def test_abort_and_bad_inputs_leave_nothing(tmp_path: Path) -> None:
    final = tmp_path / "part-00000.parquet"
    writer = PartWriter(final, part_schema(["probability"]))
    writer.add(0, np.arange(4), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"values have shape \(4, 2\), expected \(4, 1\)"):
        writer.add(0, np.arange(4), np.zeros((4, 2), np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == [] and not part_complete(final, [4], ["probability"])
    with pytest.raises(ValueError, match="first column must be row_id"):
        PartWriter(final, pa.schema([("probability", pa.float32())]))
    with pytest.raises(ValueError, match="'label' is int8"):
        PartWriter(final, pa.schema([("row_id", pa.int64()), ("label", pa.int8())]))


def test_row_id_checksum_ignores_order_and_sees_any_change() -> None:
    ids = np.array([5, 1, 9, 3])
    assert row_id_checksum(ids) == row_id_checksum(ids[::-1]) == row_id_checksum(ids.astype(np.int32))
    assert row_id_checksum(ids) != row_id_checksum(np.array([5, 1, 9, 4]))
    assert row_id_checksum(np.zeros(0, np.int64)) == "0:0:0000000000000000"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_parts_are_dealt_once_each_with_the_rows_balanced(world_size: int) -> None:
    # an N-rank prepare's parts: each rank's full parts, then its tail
    rows = [4_194_304, 300_000, 4_194_304, 300_000, 1_000, 65_536, 0]
    dealt = deal_parts(rows, world_size)
    assert len(dealt) == world_size
    assert sorted(part for parts in dealt for part in parts) == list(range(len(rows)))
    assert all(parts == sorted(parts) for parts in dealt)  # each rank writes its parts in input order
    loads = [sum(rows[part] for part in parts) for parts in dealt]
    # greedy largest-first: no rank exceeds the mean by more than the largest part
    assert max(loads) <= sum(rows) / world_size + max(rows)
    assert deal_parts(rows, world_size) == dealt  # every rank computes the same dealing


def test_alternating_large_and_small_parts_split_evenly_over_two_ranks() -> None:
    rows = [4_194_304, 300_000, 4_194_304, 300_000]
    loads = [sum(rows[part] for part in parts) for parts in deal_parts(rows, 2)]
    assert loads == [4_494_304, 4_494_304]  # by index (i mod 2) one rank would get both large parts


def test_the_row_id_digest_fed_block_by_block_equals_the_whole_parts_checksum() -> None:
    row_ids = np.random.default_rng(0).integers(0, 10**12, 50_000)
    digest = RowIdDigest()
    for block in np.array_split(row_ids, 9):
        digest.update(block)
    assert str(digest) == row_id_checksum(row_ids) == row_id_checksum(row_ids[::-1])
    assert digest.count == len(row_ids) and digest.total == int(row_ids.sum())
