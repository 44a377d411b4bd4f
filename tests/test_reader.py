"""ParquetReader: batch contents, dealing of rows, shuffling, resuming, id and column validation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_kd.data.batch import Batch
from recsys_kd.data.loader import ResumableLoader
from recsys_kd.data.reader import IdRangeError, ParquetReader, ReaderConfig
from recsys_kd.data.schema import IdRule, Schema, SchemaError, SparseFeature, SplitInfo
from tests.helpers import read_split

DENSE = ["d0", "d1"]
# the multi-hot feature sits between single-valued ones so key order is exercised
SPARSE = [
    SparseFeature("c0", 7, IdRule("identity")),
    SparseFeature("m0", 20, IdRule("identity"), multi_hot=True),
    SparseFeature("c1", 50, IdRule("hash")),
    SparseFeature("c2", 1000, IdRule("hash")),
]
EXTRA = ["teacher_logit"]
# 513 train rows in row groups of 50: 11 + 5 units, two of them short
PARTS: Dict[str, Sequence[int]] = {"train": (300, 213), "valid": (90,)}


def make_table(first_row_id: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """``rows`` random rows with consecutive row_ids; multi-hot lengths 0..3."""
    columns = {
        "row_id": pa.array(np.arange(first_row_id, first_row_id + rows, dtype=np.int64)),
        "label": pa.array(rng.integers(0, 2, rows).astype(np.float32)),
    }
    for name in DENSE:
        columns[name] = pa.array(rng.standard_normal(rows).astype(np.float32))
    for feature in SPARSE:
        if feature.multi_hot:
            offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 4, rows))]).astype(np.int32)
            values = pa.array(rng.integers(0, feature.num_embeddings, int(offsets[-1])), type=pa.int64())
            columns[feature.name] = pa.ListArray.from_arrays(pa.array(offsets), values)
        else:
            columns[feature.name] = pa.array(rng.integers(0, feature.num_embeddings, rows), type=pa.int64())
    for name in EXTRA:
        columns[name] = pa.array(rng.standard_normal(rows).astype(np.float32))
    return pa.table(columns)


def write_dataset(
    directory: Path, parts: Dict[str, Sequence[int]] = PARTS, row_group_size: int = 50, seed: int = 0
) -> Schema:
    """One Parquet part per entry of ``parts[split]`` (its row count), plus schema.json."""
    rng = np.random.default_rng(seed)
    splits = {}
    first_row_id = 0
    for split, sizes in parts.items():
        (directory / split).mkdir(parents=True, exist_ok=True)
        files = []
        for index, rows in enumerate(sizes):
            name = f"{split}/part-{index:05d}.parquet"
            pq.write_table(make_table(first_row_id, rows, rng), directory / name, row_group_size=row_group_size)
            files.append(name)
            first_row_id += rows
        splits[split] = SplitInfo(files=files, rows=sum(sizes))
    schema = Schema(name="tiny", label="label", dense=DENSE, sparse=SPARSE, extra=EXTRA, splits=splits)
    schema.save(directory)
    return schema


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    write_dataset(directory)
    return directory


def row_ids(batches: Sequence[Batch]) -> np.ndarray:
    return np.concatenate([batch.row_ids.numpy() for batch in batches]) if batches else np.empty(0, np.int64)


def assert_same_batches(actual: Sequence[Batch], expected: Sequence[Batch]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a.row_ids, e.row_ids)
        assert torch.equal(a.dense, e.dense)
        assert torch.equal(a.sparse.values(), e.sparse.values())
        assert torch.equal(a.sparse.lengths(), e.sparse.lengths())
        assert (a.worker, a.rows_consumed) == (e.worker, e.rows_consumed)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_match_the_source_columns(dataset: Path, shuffle: bool) -> None:
    config = ReaderConfig(batch_size=64, shuffle=shuffle, shuffle_window_row_groups=3, extras=["teacher_logit"])
    source = read_split(dataset, "train")
    by_row = {int(r): i for i, r in enumerate(source.column("row_id").to_numpy())}
    batches = list(ParquetReader(dataset, "train", config))

    assert [b.batch_size for b in batches] == [64] * 8 + [1]
    if not shuffle:
        assert np.array_equal(row_ids(batches), source.column("row_id").to_numpy())  # file order
    for batch in batches:
        size = batch.batch_size
        assert batch.dense.shape == (size, 2) and batch.dense.dtype == torch.float32
        assert batch.labels.shape == (size,) and batch.labels.dtype == torch.float32
        assert batch.row_ids.dtype == torch.int64
        assert set(batch.extras) == {"teacher_logit"} and batch.extras["teacher_logit"].dtype == torch.float32
        assert batch.sparse.keys() == ["c0", "m0", "c1", "c2"] and batch.sparse.stride() == size
        rows = [by_row[int(r)] for r in batch.row_ids]
        taken = source.take(rows)
        for j, name in enumerate(DENSE):
            assert np.array_equal(batch.dense[:, j].numpy(), taken.column(name).to_numpy())
        assert np.array_equal(batch.labels.numpy(), taken.column("label").to_numpy())
        assert np.array_equal(batch.extras["teacher_logit"].numpy(), taken.column("teacher_logit").to_numpy())
        features = batch.sparse.to_dict()
        for name in ("c0", "c1", "c2"):
            assert np.array_equal(features[name].values().numpy(), taken.column(name).to_numpy())
            assert torch.all(features[name].lengths() == 1)
        lists = taken.column("m0").to_pylist()
        assert features["m0"].lengths().tolist() == [len(ids) for ids in lists]
        assert features["m0"].values().tolist() == [i for ids in lists for i in ids]


def test_batch_feeds_an_embedding_bag_collection(dataset: Path) -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=4, num_embeddings=f.num_embeddings, feature_names=[f.name])
        for f in SPARSE
    ]
    collection = EmbeddingBagCollection(tables=tables)
    batch = next(iter(ParquetReader(dataset, "train", ReaderConfig(batch_size=32, shuffle=True))))
    pooled = collection(batch.sparse).to_dict()
    assert {name: tuple(t.shape) for name, t in pooled.items()} == {f.name: (32, 4) for f in SPARSE}


def test_batch_to_keeps_every_field(dataset: Path) -> None:
    batch = next(iter(ParquetReader(dataset, "train", ReaderConfig(batch_size=16, extras=["teacher_logit"]))))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert set(moved.extras) == {"teacher_logit"} and torch.equal(moved.row_ids, batch.row_ids)
    assert (moved.worker, moved.rows_consumed) == (batch.worker, batch.rows_consumed) == (0, 16)


def test_sizes_and_drop_last(dataset: Path) -> None:
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=100, shuffle=True))
    assert reader.num_rows() == 513 and reader.num_batches() == 6 == len(list(reader))
    dropping = ParquetReader(dataset, "train", ReaderConfig(batch_size=100, shuffle=True, drop_last=True))
    batches = list(dropping)
    assert dropping.num_batches() == 5 == len(batches) and all(b.batch_size == 100 for b in batches)


def test_shuffle_permutes_rows_deterministically(dataset: Path) -> None:
    def epoch_rows(seed: int = 0, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
        config = ReaderConfig(batch_size=37, shuffle=shuffle, shuffle_window_row_groups=3, seed=seed)
        reader = ParquetReader(dataset, "train", config)
        reader.set_epoch(epoch)
        return row_ids(list(reader))

    plain = epoch_rows(shuffle=False)
    shuffled = epoch_rows()
    assert np.array_equal(np.sort(shuffled), np.arange(513))  # every row once
    assert not np.array_equal(shuffled, plain)
    assert np.array_equal(shuffled, epoch_rows())
    assert not np.array_equal(shuffled, epoch_rows(seed=1))
    next_epoch = epoch_rows(epoch=1)
    assert not np.array_equal(shuffled, next_epoch) and np.array_equal(np.sort(next_epoch), np.arange(513))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [0, 3, 7, 13])  # 13 = every batch: resuming yields nothing
def test_resume_mid_epoch_yields_the_remaining_batches(dataset: Path, shuffle: bool, stop_after: int) -> None:
    # batches of 40 straddle row groups (50) and windows (2 row groups)
    config = ReaderConfig(batch_size=40, shuffle=shuffle, shuffle_window_row_groups=2, seed=3, extras=["teacher_logit"])
    reference = ParquetReader(dataset, "train", config)
    reference.set_epoch(2)
    expected = list(reference)
    assert len(expected) == 13

    interrupted = ParquetReader(dataset, "train", config)
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    for _ in range(stop_after):
        next(batches)
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["rows_consumed"] == [min(40 * stop_after, 513)]

    resumed = ParquetReader(dataset, "train", config)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop of a resumed trainer: same epoch keeps the loaded position
    assert_same_batches(list(resumed), expected[stop_after:])
    assert resumed.state_dict()["rows_consumed"] == [513]
    # a new pass starts the epoch over; a new epoch starts at its beginning
    assert len(list(resumed)) == 13
    resumed.set_epoch(3)
    assert np.array_equal(np.sort(row_ids(list(resumed))), np.arange(513))


def test_resume_requires_the_same_stream(dataset: Path) -> None:
    state = ParquetReader(dataset, "train", ReaderConfig(batch_size=40, shuffle=True)).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ParquetReader(dataset, "train", ReaderConfig(batch_size=40, shuffle=True, seed=1)).load_state_dict(state)


def test_resume_with_another_batch_size_continues_the_same_rows(dataset: Path) -> None:
    """A position counts rows: resumed with batches of 64 instead of 40, the reader hands out the
    rest of the same row stream."""
    config = ReaderConfig(batch_size=40, shuffle=True, shuffle_window_row_groups=2, seed=3)
    expected = row_ids(list(ParquetReader(dataset, "train", config)))
    interrupted = ParquetReader(dataset, "train", config)
    batches = iter(interrupted)
    for _ in range(5):
        next(batches)
    resumed = ParquetReader(dataset, "train", ReaderConfig(batch_size=64, shuffle=True, shuffle_window_row_groups=2, seed=3))
    resumed.load_state_dict(interrupted.state_dict())
    assert resumed.remaining_batches() == -(-(513 - 200) // 64)
    rest = list(resumed)
    assert len(rest) == -(-(513 - 200) // 64) and np.array_equal(row_ids(rest), expected[200:])


def per_worker(batches: Sequence[Batch]) -> Dict[int, List[Batch]]:
    streams: Dict[int, List[Batch]] = {0: [], 1: []}
    for batch in batches:
        streams[batch.worker].append(batch)
    return streams


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_workers_through_a_dataloader(dataset: Path, shuffle: bool) -> None:
    config = ReaderConfig(batch_size=30, shuffle=shuffle, shuffle_window_row_groups=2)
    loader = ResumableLoader(ParquetReader(dataset, "train", config, num_workers=2))
    expected = list(loader)
    assert np.array_equal(np.sort(row_ids(expected)), np.arange(513))
    assert len(expected) == loader.num_batches()
    streams = per_worker(expected)
    assert streams[0] and streams[1]

    # stop after 5 batches: worker 0 has handed out 3, worker 1 two
    interrupted = ResumableLoader(ParquetReader(dataset, "train", config, num_workers=2))
    batches = iter(interrupted)
    taken = [next(batches) for _ in range(5)]
    state = interrupted.state_dict()
    del batches
    assert state["rows_consumed"] == [sum(b.batch_size for b in per_worker(taken)[w]) for w in (0, 1)]

    resumed = ResumableLoader(ParquetReader(dataset, "train", config, num_workers=2))
    resumed.load_state_dict(state)
    rest = per_worker(list(resumed))
    # each worker's stream continues exactly; the interleaving of workers restarts at worker 0
    for worker in (0, 1):
        assert_same_batches(rest[worker], streams[worker][len(per_worker(taken)[worker]) :])


def test_a_plain_dataloader_with_two_workers(dataset: Path) -> None:
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=50, shuffle=True), num_workers=2)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2, multiprocessing_context="forkserver")
    rows = row_ids(list(loader))
    assert np.array_equal(np.sort(rows), np.arange(513))
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(reader))


def rewrite_part(path: Path, column: str, row: int, value: int) -> int:
    """Sets ``column`` of the part's ``row``-th row (the first id of a list) to ``value``; returns its row_id."""
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    cells = table.column(column).to_pylist()
    if isinstance(cells[row], list):
        cells[row] = [value] + cells[row][1:]
    else:
        cells[row] = value
    table = table.set_column(index, table.schema.field(index), pa.array(cells, type=table.schema.field(index).type))
    pq.write_table(table, path, row_group_size=50)
    return int(table.column("row_id")[row].as_py())


@pytest.mark.parametrize(
    "column, value",
    [("c1", -3), ("c2", 1000), ("m0", 20), ("m0", -1)],
)
def test_out_of_range_ids_name_file_feature_value_and_row(tmp_path: Path, column: str, value: int) -> None:
    write_dataset(tmp_path)
    part = tmp_path / "train" / "part-00001.parquet"
    # the multi-hot row must have an id to overwrite: pick one with a non-empty list
    cells = pq.read_table(part).column(column).to_pylist()
    row = next(i for i, cell in enumerate(cells) if i > 120 and (not isinstance(cell, list) or cell))
    row_id = rewrite_part(part, column, row, value)
    limit = {f.name: f.num_embeddings for f in SPARSE}[column]

    with pytest.raises(IdRangeError) as raised:
        list(ParquetReader(tmp_path, "train", ReaderConfig(batch_size=64, shuffle=True)))
    message = str(raised.value)
    for fragment in (str(part), repr(column), f"id {value}", f"row_id {row_id}", f"[0, {limit})"):
        assert fragment in message
    assert len(list(ParquetReader(tmp_path, "train", ReaderConfig(validate_ids=False)))) == 1


def test_missing_or_mistyped_column_names_file_and_column(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    part = tmp_path / "train" / "part-00001.parquet"
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["c1"]), part)
    with pytest.raises(SchemaError, match=rf"{part}: column 'c1' is missing"):
        ParquetReader(tmp_path, "train")

    index = table.schema.get_field_index("d0")
    pq.write_table(table.set_column(index, "d0", table.column("d0").cast(pa.float64())), part)
    with pytest.raises(SchemaError, match=rf"{part}: column 'd0' has type double, expected float32"):
        ParquetReader(tmp_path, "train")


def test_footer_rows_must_match_the_schema(tmp_path: Path) -> None:
    schema = write_dataset(tmp_path)
    splits = dict(schema.splits, train=SplitInfo(files=schema.splits["train"].files, rows=500))
    schema.replace(splits=splits).save(tmp_path)
    with pytest.raises(SchemaError, match="513 rows in its Parquet footers, schema.json says 500"):
        ParquetReader(tmp_path, "train")


def test_unknown_extra_is_refused(dataset: Path) -> None:
    with pytest.raises(SchemaError, match="'logit'"):
        ParquetReader(dataset, "train", ReaderConfig(extras=["logit"]))
