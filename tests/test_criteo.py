import csv
import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_kd.data.criteo import CATEGORICAL_FEATURES, INTEGER_FEATURES, CriteoOptions
from recsys_kd.data.fields import bucketize_log_squared, bucketize_log_squared_scalar, log_transform
from recsys_kd.data.ids import hash_ids
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.quarantine import TooManyBadRows
from recsys_kd.data.schema import MISSING_ID, OOV_ID, Schema
from recsys_kd.data.split import SplitConfig
from tests.helpers import read_all


def raw_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle, delimiter="\t"))


def run(tmp_path, inputs, name="ds", **options):
    config = PrepareConfig(format="criteo", inputs=[str(p) for p in inputs], output=str(tmp_path / name), progress=False, **options)
    return prepare(config), tmp_path / name


def test_union_sample_log_mode_matches_raw_file(tmp_path, shared_data):
    path = shared_data / "criteo-kaggle-sample" / "criteo_kaggle_union.txt"
    raw = raw_rows(path)
    record, dataset = run(tmp_path, [path], ids=IdConfig(rule="hash", num_embeddings=1000, seed=7))
    assert sum(record["rows"].values()) + record["quarantined_total"] == len(raw) == 8000
    assert record["quarantined_total"] == sum(len(r) != 40 for r in raw)
    schema = Schema.load(dataset)
    assert schema.dense == INTEGER_FEATURES and schema.sparse_names == CATEGORICAL_FEATURES
    table = read_all(dataset)
    good = [r for r in raw if len(r) == 40]
    assert int(pa.compute.sum(table["label"]).as_py()) == sum(r[0] == "1" for r in good)
    assert sum(record["positives"].values()) == sum(r[0] == "1" for r in good)
    # Direct computation for every row: dense = log(1 + max(v, 0)), missing -> 0; hashed ids.
    row_ids = table["row_id"].to_numpy()
    for column, name in enumerate(INTEGER_FEATURES, start=1):
        expected = [math.log1p(max(int(raw[i][column]), 0)) if raw[i][column] else 0.0 for i in row_ids]
        np.testing.assert_allclose(table[name].to_numpy(), expected, rtol=1e-6)
    for column, name in enumerate(CATEGORICAL_FEATURES, start=14):
        values = pa.array([raw[i][column] or None for i in row_ids], pa.string())
        seed = schema.feature(name).id_rule.seed
        np.testing.assert_array_equal(table[name].to_numpy(), hash_ids(values, 1000, seed))
        assert (table[name].to_numpy() == MISSING_ID).sum() == sum(v is None for v in values.to_pylist())


def test_kd_dagfm_preprocessing_vocab_min_count_8_and_buckets(tmp_path, shared_data):
    path = shared_data / "criteo-kaggle-sample" / "wide_resdnn_train.txt"
    raw = raw_rows(path)
    record, dataset = run(
        tmp_path, [path], criteo=CriteoOptions(integers="bucketize"), ids=IdConfig(rule="vocab", min_count=8),
        split=SplitConfig(method="sequential"),
    )
    schema = Schema.load(dataset)
    assert len(schema.sparse) == 39 and not schema.dense
    assert record["rows"] == {"train": 5760, "valid": 720, "test": 720}
    table = read_all(dataset)
    # Direct count: a C1 value keeps its own id iff it occurs >= 8 times in the file.
    counts = {}
    for r in raw:
        counts[r[14]] = counts.get(r[14], 0) + 1
    vocab = pq.read_table(dataset / "vocab" / "C1.parquet").to_pydict()
    assert set(vocab["value"]) == {v for v, c in counts.items() if c >= 8 and v}
    id_of = dict(zip(vocab["value"], vocab["id"]))
    for row_id, got in zip(table["row_id"].to_pylist(), table["C1"].to_pylist()):
        value = raw[row_id][14]
        assert got == (MISSING_ID if not value else id_of.get(value, OOV_ID))
    # Integer buckets: the I5 vocabulary holds exactly the buckets of values seen >= 8 times.
    buckets = {}
    for r in raw:
        if r[5]:
            b = bucketize_log_squared_scalar(int(r[5]))
            buckets[b] = buckets.get(b, 0) + 1
    vocab_i5 = pq.read_table(dataset / "vocab" / "I5.parquet").to_pydict()
    assert set(vocab_i5["value"]) == {b for b, c in buckets.items() if c >= 8}
    assert schema.feature("I5").num_embeddings == len(vocab_i5["value"]) + 2


def test_bucketize_rule_matches_formula():
    values = [None, -3, -1, 0, 1, 2, 3, 4, 10, 100, 12345, 10**9]
    got = bucketize_log_squared(pa.array(values, pa.int64())).to_pylist()
    assert got == [None if v is None else (math.ceil(math.log(v) ** 2 + 1) if v > 2 else v) for v in values]
    assert [bucketize_log_squared_scalar(v) for v in (3, 2)] == [math.ceil(math.log(3) ** 2 + 1), 2]


def test_log_transform_matches_formula():
    values = np.array([np.nan, -2, 0, 1, 5, 1e6])
    expected = [0.0, 0.0, 0.0, math.log(2), math.log(6), math.log(1e6 + 1)]
    np.testing.assert_allclose(log_transform(values), expected, rtol=1e-6)


def planted_file(tmp_path, shared_data):
    lines = (shared_data / "criteo-kaggle-sample" / "wide_resdnn_dev.txt").read_bytes().splitlines(keepends=True)
    good = lines[:100]
    fields = good[5].rstrip(b"\n").split(b"\t")
    planted = {
        7: b"\t".join(fields[:30]) + b"\n",                                # wrong column count
        12: b"\t".join([b"2"] + fields[1:]) + b"\n",                       # bad label
        20: b"\t".join(fields[:3] + [b"1.5e3"] + fields[4:]) + b"\n",      # unparsable integer (I3)
        33: b"\t".join(fields[:3] + [b"nan"] + fields[4:]) + b"\n",        # NaN in an integer field
        41: b"\t".join(fields[:20] + [b"zz12ab34"] + fields[21:]) + b"\n", # bad hex (C7)
        50: b"\t".join(fields[:20] + [b"\xff\xfe\x00\x01"] + fields[21:]) + b"\n",  # non-UTF-8 bytes
        60: b"\n",                                                           # empty line
    }
    out = []
    for index, line in enumerate(good):
        out.append(planted.get(index, line))
    path = tmp_path / "planted.txt"
    path.write_bytes(b"".join(out))
    return path, planted


def test_quarantine_counts_reasons_with_line_numbers(tmp_path, shared_data):
    path, planted = planted_file(tmp_path, shared_data)
    record, dataset = run(tmp_path, [path], max_bad_fraction=0.5)
    assert sum(record["rows"].values()) == 100 - len(planted)
    assert record["quarantined"] == {
        "wrong_column_count": 2, "bad_label": 1, "bad_integer:I3": 2, "bad_hex:C7": 2,
    }
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(e["line"] for e in entries) == sorted(i + 1 for i in planted)
    assert all(e["file"] == str(path) for e in entries)
    by_line = {e["line"]: e for e in entries}
    assert by_line[13]["reason"] == "bad_label" and by_line[13]["text"].startswith("2\t")
    assert by_line[51]["reason"] == "bad_hex:C7"
    assert set(read_all(dataset)["row_id"].to_pylist()) == set(range(100)) - set(planted)


def test_too_many_bad_rows_fails_and_leaves_nothing(tmp_path, shared_data):
    path, planted = planted_file(tmp_path, shared_data)
    with pytest.raises(TooManyBadRows, match=r"7 of 100 rows .* max_bad_fraction=0.05 .*bad_label: 1"):
        run(tmp_path, [path], max_bad_fraction=0.05)
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    with pytest.raises(TooManyBadRows):
        run(tmp_path, [path], max_bad_fraction=0.05, ids=IdConfig(rule="vocab"))


def test_day_files_gzip_and_day_split(tmp_path, shared_data):
    lines = (shared_data / "criteo-kaggle-sample" / "wide_resdnn_test.txt").read_bytes().splitlines(keepends=True)
    days = tmp_path / "raw"
    days.mkdir()
    (days / "day_0").write_bytes(b"".join(lines[:200]))
    with gzip.open(days / "day_1.gz", "wb") as handle:
        handle.write(b"".join(lines[200:]))
    record, dataset = run(tmp_path, [days], split=SplitConfig(method="day", test_days=[1]))
    assert record["rows"] == {"train": 200, "valid": 0, "test": len(lines) - 200}
    table = read_all(dataset)
    assert table.num_rows == len(lines) and len(set(table["row_id"].to_pylist())) == len(lines)


def test_output_exists_needs_overwrite(tmp_path, shared_data):
    path = shared_data / "criteo-kaggle-sample" / "wide_resdnn_test.txt"
    run(tmp_path, [path])
    with pytest.raises(FileExistsError):
        run(tmp_path, [path])
    record, dataset = run(tmp_path, [path], overwrite=True)
    assert sum(record["rows"].values()) == 391
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
