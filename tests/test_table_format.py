"""Users' own logs (``format: table``: CSV, TSV, Parquet, JSON lines), libSVM/libFM files (``format:
libsvm``) and MovieLens genres, checked against direct computations from the rows the tests write."""

import csv
import datetime
import gzip
import json
import math
import random
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_kd.cli import main
from recsys_kd.data.ids import hash_ids
from recsys_kd.data.libsvm import LibSVMOptions, LibSVMSource
from recsys_kd.data.movielens import ML100K_GENRES, MovieLensOptions, MovieLensSource
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.quarantine import Quarantine, TooManyBadRows
from recsys_kd.data.rawtext import read_delimited
from recsys_kd.data.schema import Schema
from recsys_kd.data.source import InputError
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.moments import ExactSum
from recsys_kd.data.table_spec import DenseColumn, LabelRule, MultiHotColumn, TableOptions, TimeColumn
from tests.helpers import read_all, read_split
from tests.test_converters import recbole_rows

COLUMNS = ["clicked", "user", "price", "age", "score", "tags", "ts", "city"]
START = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def logical_rows(n=400, seed=0):
    """The logical data every file format holds: Python values, None = missing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "clicked": rng.randint(0, 1),
            "user": rng.randint(1, 40),
            "price": None if i % 11 == 0 else round(rng.uniform(-5, 500), rng.choice([0, 1, 3])),
            "age": rng.randint(15, 80),
            "score": round(rng.gauss(10, 30), 2),
            "tags": rng.sample(["a", "b", "c", "d", "e", "ü"], rng.randint(0, 4)),
            "ts": START + rng.randint(0, 6 * 86400),
            "city": None if i % 7 == 0 else rng.choice(["Paris", "Berlin", "São Paulo", "Köln"]),
        })
    return rows


def text(value):
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def write_delimited(path, rows, delimiter):
    lines = [delimiter.join(COLUMNS)]
    for row in rows:
        lines.append(delimiter.join("|".join(v) if k == "tags" else text(v) for k, v in row.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_quoted(path, rows, delimiter, quoting=csv.QUOTE_MINIMAL, line_end="\n"):
    """The rows as Python's csv module (as pandas, Excel, Spark) quotes them: RFC 4180."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, quoting=quoting, lineterminator=line_end)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(["|".join(v) if k == "tags" else text(v) for k, v in row.items()])


def quoted_rows(rows):
    """The logical rows with values that need quoting: separators, quotes and tabs in cities and tags."""
    cities = {"Paris": 'Paris, "FR"', "Berlin": "Berlin\tMitte", "Köln": '"Köln"'}
    return [dict(row, city=cities.get(row["city"], row["city"]),
                 tags=['e,"f"' if tag == "e" else tag for tag in row["tags"]]) for row in rows]


def write_parquet(path, rows):
    table = pa.table({
        "clicked": pa.array([r["clicked"] for r in rows], pa.int8()),
        "user": pa.array([r["user"] for r in rows], pa.int64()),
        "price": pa.array([r["price"] for r in rows], pa.float64()),
        "age": pa.array([r["age"] for r in rows], pa.int32()),
        "score": pa.array([r["score"] for r in rows], pa.float64()),
        "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),
        "ts": pa.array([r["ts"] for r in rows], pa.int64()),
        "city": pa.array([r["city"] for r in rows], pa.string()),
    })
    pq.write_table(table, path, row_group_size=97)  # several row groups


def write_jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            record = dict(row)
            if i % 2:
                record["tags"] = "|".join(row["tags"])  # a separated string, or a JSON array
            if record["city"] is None and i % 3 == 0:
                del record["city"]  # an absent key is a missing value, as null is
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def spec(**changes):
    options = dict(
        label=LabelRule(column="clicked"),
        dense=[
            DenseColumn("price", transform="log"),
            DenseColumn("score", transform="standardize"),
            DenseColumn("age", transform="bucketize", boundaries=[18, 25, 35, 50, 65]),
        ],
        sparse=["user", "city"],
        multi_hot=[MultiHotColumn("tags", separator="|", max_length=3)],
        time=TimeColumn("ts", unit="seconds"),
    )
    options.update(changes)
    return TableOptions(**options)


def run_table(tmp_path, inputs, name, options=None, **config):
    config.setdefault("ids", IdConfig(rule="vocab"))
    prepare_config = PrepareConfig(format="table", inputs=[str(p) for p in inputs], output=str(tmp_path / name),
                                   table=options or spec(), progress=False, **config)
    return prepare(prepare_config), tmp_path / name


def dataset_content(dataset):
    """Everything a dataset holds but where its inputs were: parts, schema, vocabularies."""
    schema = Schema.load(dataset)
    vocab = {f.name: pq.read_table(dataset / f.id_rule.vocab_file).to_pydict()
             for f in schema.sparse if f.id_rule.vocab_file}
    splits = {name: read_split(dataset, name).to_pydict() for name in schema.splits}
    return schema.replace(source={}, splits={k: v.rows for k, v in schema.splits.items()}), vocab, splits


@pytest.fixture(scope="module")
def rows():
    return logical_rows()


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("table")
    write_delimited(root / "logs.csv", rows, ",")
    return run_table(root, [root / "logs.csv"], "csv")


def test_csv_tsv_parquet_jsonl_give_the_same_dataset(tmp_path, rows, csv_dataset):
    write_delimited(tmp_path / "logs.tsv", rows, "\t")
    write_parquet(tmp_path / "logs.parquet", rows)
    write_jsonl(tmp_path / "logs.jsonl.gz", rows)
    record, expected = csv_dataset
    assert record["quarantined_total"] == 0 and sum(record["rows"].values()) == len(rows)
    reference = dataset_content(expected)
    for name in ("logs.tsv", "logs.parquet", "logs.jsonl.gz"):
        _, dataset = run_table(tmp_path, [tmp_path / name], name.split(".")[1])
        assert dataset_content(dataset) == reference, name
    # Blocks of a few lines (so a few rows per chunk, standardize statistics summed chunk by chunk),
    # and the rows spread over two files, give the same dataset too.
    write_delimited(tmp_path / "first.csv", rows[:150], ",")
    write_delimited(tmp_path / "second.csv", rows[150:], ",")
    _, dataset = run_table(tmp_path, [tmp_path / "first.csv", tmp_path / "second.csv"], "two", block_bytes=200)
    assert dataset_content(dataset) == reference


def test_dense_transforms_match_numpy(rows, csv_dataset):
    record, dataset = csv_dataset
    table = read_all(dataset).to_pydict()
    source_rows = [rows[i] for i in table["row_id"]]  # row_id = the record's index
    price = np.array([np.nan if r["price"] is None else r["price"] for r in source_rows])
    expected_log = np.where(np.isnan(price), 0.0, np.log1p(np.maximum(price, 0.0)))
    np.testing.assert_allclose(table["price"], expected_log.astype(np.float32), rtol=1e-6)
    train_ids = set(read_split(dataset, "train")["row_id"].to_pylist())
    train_scores = np.array([rows[i]["score"] for i in sorted(train_ids)])
    mean, std = train_scores.mean(), train_scores.std()
    score = np.array([r["score"] for r in source_rows])
    np.testing.assert_allclose(table["score"], ((score - mean) / std).astype(np.float32), rtol=1e-5, atol=1e-6)
    recorded = re.search(r"score: \(v - (\S+)\) / (\S+?);", Schema.load(dataset).dense_transform)
    assert (float(recorded[1]), float(recorded[2])) == pytest.approx((mean, std), rel=1e-12)
    boundaries = [18, 25, 35, 50, 65]
    buckets = [sum(b <= r["age"] for b in boundaries) for r in source_rows]
    ids = Schema.load(dataset).feature("age")
    vocab = pq.read_table(dataset / ids.id_rule.vocab_file)["value"].to_pylist()
    assert [vocab[i - 2] for i in table["age"]] == buckets


@pytest.mark.parametrize("method", ["permutation", "sequential"])
def test_standardize_statistics_come_from_the_training_rows_of_count_based_splits(tmp_path, rows, method):
    write_delimited(tmp_path / "logs.csv", rows, ",")
    options = spec(dense=[DenseColumn("score", transform="standardize")], time=None)
    _, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], method, options, split=SplitConfig(method=method, seed=3))
    train = read_split(dataset, "train").to_pydict()
    scores = np.array([rows[i]["score"] for i in train["row_id"]])
    if method == "sequential":
        assert train["row_id"] == list(range(int(0.8 * len(rows))))
    expected = (scores - scores.mean()) / scores.std()
    np.testing.assert_allclose(train["score"], expected.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_clip_none_and_hash_ids(tmp_path, rows):
    write_delimited(tmp_path / "logs.csv", rows, ",")
    options = spec(dense=[DenseColumn("score", transform="clip", min=-10, max=40), DenseColumn("price")], time=None)
    _, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], "clip", options, ids=IdConfig(num_embeddings=101, seed=4))
    table = read_all(dataset).to_pydict()
    source_rows = [rows[i] for i in table["row_id"]]
    score = np.array([r["score"] for r in source_rows])
    np.testing.assert_allclose(table["score"], np.clip(score, -10, 40).astype(np.float32))
    np.testing.assert_allclose(table["price"], [0.0 if r["price"] is None else np.float32(r["price"]) for r in source_rows])
    schema = Schema.load(dataset)
    users = pa.array([str(r["user"]) for r in source_rows])
    np.testing.assert_array_equal(table["user"], hash_ids(users, 101, schema.feature("user").id_rule.seed))


def test_exact_sum_is_independent_of_order_and_chunking():
    rng = np.random.default_rng(1)
    values = rng.normal(size=5000) * 10.0 ** rng.integers(-300, 300, size=5000)
    whole = ExactSum()
    whole.add(values)
    assert whole.fraction() == sum(Fraction(v) for v in values.tolist())  # exact
    assert float(whole.fraction()) == math.fsum(values)
    pieces = [ExactSum() for _ in range(3)]
    shuffled = rng.permutation(values)
    for piece, part in zip(pieces, np.array_split(shuffled, [7, 1234])):
        piece.add(part)
    assert (pieces[0] + pieces[1] + pieces[2]).units == whole.units


def test_label_rules(tmp_path):
    lines = ["action,user", "click,1", "view,2", "buy,3", "skip,4", "bogus,5", "view,6", ",7"]
    (tmp_path / "logs.csv").write_text("\n".join(lines) + "\n")
    rule = LabelRule(column="action", values={"click": 1, "buy": 1, "view": 0}, drop=["skip"])
    options = TableOptions(label=rule, sparse=["user"])
    record, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], "values", options, max_bad_fraction=0.5)
    table = read_all(dataset).to_pydict()
    assert table["row_id"] == [0, 1, 2, 5] and table["label"] == [1.0, 0.0, 1.0, 0.0]
    assert record["dropped_by_rule"] == {"label_skip": 1}
    assert record["quarantined"] == {"bad_label:action": 2}
    # threshold: rating >= 4 is a click; -1/+1 and 0/1 with a threshold of 0.5
    (tmp_path / "ratings.csv").write_text("rating,user\n4.5,1\n3,2\n4,3\n-1,4\nx,5\n")
    options = TableOptions(label=LabelRule(column="rating", threshold=4), sparse=["user"])
    record, dataset = run_table(tmp_path, [tmp_path / "ratings.csv"], "threshold", options, max_bad_fraction=0.5)
    assert read_all(dataset)["label"].to_pylist() == [1.0, 0.0, 1.0, 0.0]
    assert record["quarantined"] == {"bad_label:rating": 1}
    # default: the label must be 0 or 1
    (tmp_path / "binary.csv").write_text("label,user\n1,1\n0,2\n2,3\n1.0,4\n")
    options = TableOptions(sparse=["user"])
    record, dataset = run_table(tmp_path, [tmp_path / "binary.csv"], "binary", options, max_bad_fraction=0.5)
    assert read_all(dataset)["label"].to_pylist() == [1.0, 0.0, 1.0]
    assert record["quarantined"] == {"bad_label:label": 1}


def test_multi_hot_separator_and_max_length(tmp_path, rows):
    lines = ["label\ttopics"] + [f"{i % 2}\t{value}" for i, value in enumerate(["a;b;c;d", "", "x;;y", ";z;", "q"])]
    (tmp_path / "logs.tsv").write_text("\n".join(lines) + "\n")
    options = TableOptions(multi_hot=[MultiHotColumn("topics", separator=";", max_length=2)])
    _, dataset = run_table(tmp_path, [tmp_path / "logs.tsv"], "multi", options)
    schema = Schema.load(dataset)
    assert schema.feature("topics").multi_hot
    vocab = pq.read_table(dataset / schema.feature("topics").id_rule.vocab_file)["value"].to_pylist()
    got = [[vocab[i - 2] for i in ids] for ids in read_all(dataset)["topics"].to_pylist()]
    assert got == [[t for t in line.split("\t")[1].split(";") if t][:2] for line in lines[1:]]


def test_time_column_day_split(tmp_path, rows):
    write_delimited(tmp_path / "logs.csv", rows, ",")
    day = lambda ts: (datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).date() - datetime.date(1970, 1, 1)).days
    days = sorted({day(r["ts"]) for r in rows})
    split = SplitConfig(method="day", valid_days=[days[-2]], test_days=[days[-1]])
    record, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], "days", split=split)
    for name, wanted in (("train", set(days[:-2])), ("valid", {days[-2]}), ("test", {days[-1]})):
        ids = read_split(dataset, name)["row_id"].to_pylist()
        assert ids and {day(rows[i]["ts"]) for i in ids} == wanted
        assert record["rows"][name] == sum(day(r["ts"]) in wanted for r in rows)
    # the same days from milliseconds and from ISO dates
    (tmp_path / "ms.csv").write_text("label,t,u\n" + "".join(f"1,{r['ts'] * 1000},{i}\n" for i, r in enumerate(rows)))
    (tmp_path / "date.csv").write_text("label,t,u\n" + "".join(
        f"1,{datetime.datetime.fromtimestamp(r['ts'], datetime.timezone.utc).isoformat()},{i}\n" for i, r in enumerate(rows)))
    for name, unit in (("ms.csv", "milliseconds"), ("date.csv", "date")):
        options = TableOptions(sparse=["u"], time=TimeColumn("t", unit=unit))
        _, dataset = run_table(tmp_path, [tmp_path / name], unit, options, split=split)
        assert sorted(read_split(dataset, "test")["row_id"].to_pylist()) == sorted(
            read_split(tmp_path / "days", "test")["row_id"].to_pylist())


def test_bad_rows_are_quarantined_with_file_and_line(tmp_path, rows):
    write_delimited(tmp_path / "logs.csv", rows[:50], ",")
    lines = (tmp_path / "logs.csv").read_text().splitlines()
    planted = {
        3: ("bad_label:clicked", "7" + lines[3][1:]),
        5: ("bad_number:score", lines[5].replace(text(rows[4]["score"]), "lots", 1)),
        8: ("wrong_column_count", lines[8] + ",extra"),
        12: ("bad_time:ts", lines[12].replace(str(rows[11]["ts"]), "yesterday")),
        20: ("invalid_utf8:city", None),
    }
    for index, (_, line) in planted.items():
        if line is not None:
            lines[index] = line
    encoded = [line.encode() for line in lines]
    encoded[20] = encoded[20][: encoded[20].rindex(b",") + 1] + b"\xffx"  # the city (last column) not UTF-8
    (tmp_path / "logs.csv").write_bytes(b"\n".join(encoded) + b"\n")
    json_lines = [json.dumps(r) for r in rows[:20]]
    json_lines[2] = "{not json"
    json_lines[4] = json.dumps({**rows[4], "user": {"id": 1}})
    (tmp_path / "more.jsonl").write_text("\n".join(json_lines) + "\n")
    record, dataset = run_table(tmp_path, [tmp_path / "logs.csv", tmp_path / "more.jsonl"], "bad", max_bad_fraction=0.2)
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    got = {(e["file"].rsplit("/", 1)[1], e["line"]): e["reason"] for e in entries}
    expected = {("logs.csv", i + 1): reason for i, (reason, _) in planted.items()}
    expected.update({("more.jsonl", 3): "bad_json", ("more.jsonl", 5): "bad_value:user"})
    assert got == expected
    assert sum(record["rows"].values()) == 50 + 20 - len(expected)
    assert [e["text"] for e in entries if e["line"] == 4] == [lines[3]]
    # row ids continue over files: the second file's record i is row 50 + i
    assert max(read_all(dataset)["row_id"].to_pylist()) == 50 + 19
    with pytest.raises(TooManyBadRows, match="bad_json: 1"):
        run_table(tmp_path, [tmp_path / "logs.csv", tmp_path / "more.jsonl"], "strict", max_bad_fraction=0.01)
    # Parquet: the quarantined row's number in the file
    bad_parquet = pa.table({"label": pa.array([1, 0, 5, 1]), "u": pa.array(["a", "b", "c", "d"])})
    pq.write_table(bad_parquet, tmp_path / "p.parquet")
    record, dataset = run_table(tmp_path, [tmp_path / "p.parquet"], "pq", TableOptions(sparse=["u"]), max_bad_fraction=0.5)
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"], json.loads(e["text"])) for e in entries] == [(3, "bad_label:label", {"label": "5", "u": "c"})]


def test_missing_column_and_unknown_format_are_one_line_errors(tmp_path):
    (tmp_path / "logs.csv").write_text("label,user\n1,2\n")
    with pytest.raises(InputError, match=r"logs.csv: no column 'city' in the header \(has: label, user\)"):
        run_table(tmp_path, [tmp_path / "logs.csv"], "x", TableOptions(sparse=["user", "city"]))
    (tmp_path / "logs.txt").write_text("label,user\n1,2\n")
    with pytest.raises(InputError, match="logs.txt: cannot tell the file format"):
        run_table(tmp_path, [tmp_path / "logs.txt"], "y", TableOptions(sparse=["user"]))
    pq.write_table(pa.table({"label": [1], "user": [[1, 2]]}), tmp_path / "lists.parquet")
    with pytest.raises(InputError, match="lists.parquet: column 'user' holds list"):
        run_table(tmp_path, [tmp_path / "lists.parquet"], "z", TableOptions(sparse=["user"]))


# --- quoted CSV / TSV (RFC 4180) --------------------------------------------------------------------


def test_quoted_csv_and_tsv_give_the_dataset_of_their_rows(tmp_path, rows):
    """Quoted separators, tabs and doubled quotes in values, quoted numbers, labels, multi-hot fields and
    header names (QUOTE_ALL), CRLF endings, blocks with and without quotes: the dataset Parquet gives."""
    quoted = quoted_rows(rows)
    write_parquet(tmp_path / "logs.parquet", quoted)
    _, reference = run_table(tmp_path, [tmp_path / "logs.parquet"], "parquet")
    expected = dataset_content(reference)
    variants = [("all.csv", ",", csv.QUOTE_ALL, "\r\n", 16 << 20), ("minimal.csv", ",", csv.QUOTE_MINIMAL, "\n", 300),
                ("minimal.tsv", "\t", csv.QUOTE_MINIMAL, "\n", 16 << 20)]
    for name, delimiter, quoting, line_end, block_bytes in variants:
        write_quoted(tmp_path / name, quoted, delimiter, quoting, line_end)
        record, dataset = run_table(tmp_path, [tmp_path / name], name.replace(".", "_"), block_bytes=block_bytes)
        assert record["quarantined_total"] == 0, name
        assert dataset_content(dataset) == expected, name
    written = (tmp_path / "all.csv").read_text(encoding="utf-8")
    assert written.startswith('"clicked","user"') and '"Paris, ""FR"""' in written
    assert '"Berlin\tMitte"' in (tmp_path / "minimal.tsv").read_text(encoding="utf-8")


def test_malformed_quotes_are_quarantined_with_file_and_line(tmp_path):
    lines = [
        'label,user,city',
        '1,u1,"Paris, FR"',
        '0,"u""2""",Berlin',
        '1,u3,"Köln" am Rhein',  # text after the closing quote
        '0,u"4,Rom',  # a quote inside an unquoted field
        '1,u5,"Lyon',  # no closing quote
        '0,u6,"Nice',  # a quoted line break: the record's first line ends inside the quotes ...
        'Côte d\'Azur",x',  # ... and its second has a quote inside a field
        '1,"u7","Porto"',
        '1,u8,"a","b"',  # four fields
        '"1,u9,Oslo"',  # one field
        '7,"u,10",Bern',  # well quoted, a bad label
    ]
    (tmp_path / "logs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = TableOptions(sparse=["user", "city"])
    record, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], "bad", options, max_bad_fraction=0.9)
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert {(Path(e["file"]).name, e["line"]): e["reason"] for e in entries} == {
        ("logs.csv", 4): "bad_quote", ("logs.csv", 5): "bad_quote", ("logs.csv", 6): "unterminated_quote",
        ("logs.csv", 7): "unterminated_quote", ("logs.csv", 8): "bad_quote", ("logs.csv", 10): "wrong_column_count",
        ("logs.csv", 11): "wrong_column_count", ("logs.csv", 12): "bad_label:label"}
    assert [e["text"] for e in entries if e["line"] != 12] == [lines[i - 1] for i in (4, 5, 6, 7, 8, 10, 11)]
    # a row refused after parsing is shown as a line that parses back to its values
    assert list(csv.reader([entries[-1]["text"]])) == [["7", "u,10", "Bern"]]
    assert values(dataset, "user") == ['u1', 'u"2"', 'u7'] and values(dataset, "city") == ["Paris, FR", "Berlin", "Porto"]
    assert read_all(dataset)["row_id"].to_pylist() == [0, 1, 7]

    # quote_char none: a quote is an ordinary character (and a quoted separator separates)
    literal = TableOptions(sparse=["user", "city"], quote_char="none")
    record, dataset = run_table(tmp_path, [tmp_path / "logs.csv"], "none", literal, max_bad_fraction=0.9)
    assert set(record["quarantined"]) == {"wrong_column_count", "bad_label:label"}
    assert 'u"4' in values(dataset, "user") and '"Köln" am Rhein' in values(dataset, "city")

    (tmp_path / "header.csv").write_text('label,"user\n1,2\n')
    with pytest.raises(InputError, match=r"header.csv:1: the header line is malformed \(unterminated_quote\)"):
        run_table(tmp_path, [tmp_path / "header.csv"], "header", TableOptions(sparse=["user"]))
    for wrong in (",", "\t", "\n", "''"):
        with pytest.raises(ValueError, match="quote_char"):
            TableOptions(quote_char=wrong).validate()


def values(dataset, column):
    """A vocabulary-id column's values as text, in row_id order."""
    feature = Schema.load(dataset).feature(column)
    vocab = pq.read_table(dataset / feature.id_rule.vocab_file)["value"].to_pylist()
    return [vocab[i - 2] for i in read_all(dataset)[column].to_pylist()]


def rfc4180(line, separator):
    """A strict RFC 4180 reading of one line, written out plainly: its fields, or why it is malformed."""
    fields, at = [], 0
    while True:
        if line[at:at + 1] == '"':
            value, at = "", at + 1
            while True:
                close = line.find('"', at)
                if close < 0:
                    return "unterminated_quote"
                value += line[at:close]
                if line[close + 1:close + 2] != '"':
                    break
                value, at = value + '"', close + 2
            at = close + 1
            if at < len(line) and line[at] != separator:
                return "bad_quote"
        else:
            end = line.find(separator, at)
            end = len(line) if end < 0 else end
            value = line[at:end]
            if '"' in value:
                return "bad_quote"
            at = end
        fields.append(value)
        if at >= len(line):
            return fields
        at += 1


QUOTED_LINES = st.lists(st.one_of(
    st.text(alphabet='ab,"é ', max_size=14),  # anything, mostly malformed
    st.lists(st.text(alphabet='ab,"é \t', max_size=5), min_size=1, max_size=4).map(  # as csv writes them
        lambda values: csv_line(values)),
), min_size=1, max_size=25)


def csv_line(values):
    out = []
    csv.writer(WriteTo(out), quoting=csv.QUOTE_MINIMAL, lineterminator="").writerow(values)
    return "".join(out)


class WriteTo:
    def __init__(self, out):
        self.write = out.append


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(lines=QUOTED_LINES, block_bytes=st.sampled_from([64, 4096]))
def test_quoted_lines_read_as_a_plain_rfc4180_reader_reads_them(lines, block_bytes):
    """Every line's fields (3 expected) or quarantine reason are the plain reader's; a well-formed line
    reads as Python's csv module reads it."""
    names = ["a", "b", "c"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.csv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        quarantine = Quarantine(Path(folder) / "q.jsonl")
        blocks = list(read_delimited(path, names, ",", quarantine, block_bytes=block_bytes, quote_char='"'))
        quarantine.close()
        reasons = {json.loads(e)["line"] - 1: json.loads(e)["reason"]
                   for e in (Path(folder) / "q.jsonl").read_text(encoding="utf-8").splitlines()}
    rows = {int(line): [block.table.column(n)[i].as_py().decode() for n in names]
            for block in blocks for i, line in enumerate(block.lines)}
    for number, line in enumerate(lines):
        expected = rfc4180(line, ",")
        if isinstance(expected, str):
            assert reasons.get(number) == expected, line
        elif len(expected) != 3:
            assert reasons.get(number) == "wrong_column_count", line
        else:
            assert rows.get(number) == expected == next(csv.reader([line], strict=True)), line
    assert len(rows) + len(reasons) == len(lines)


def test_the_worked_example_of_the_docs_runs(tmp_path, rows):
    """docs/prepare.md's recipe for a user's own CSV, run as a user runs it, on logs of its columns."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "prepare.md").read_text()
    section = docs[docs.index("## Your own logs"):]
    sample = section.split("```\n", 2)[1]
    recipe = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_logs.yaml").write_text(recipe)
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"{r['clicked']},u{r['user']},i{r['age'] * 7 % 50},{text(r['price'])},{abs(r['score'])},{r['age']},"
             f"{'|'.join(r['tags'])},{r['ts']},{text(r['city'])}" for r in rows]
    (logs / "clicks.csv").write_text(sample + "\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "data"
    assert main(["prepare", "-c", str(tmp_path / "my_logs.yaml"), f"prepare.inputs=[{logs}]",
                 f"prepare.output={output}", "prepare.progress=false"]) == 0
    schema = Schema.load(output)
    assert schema.dense == ["price", "dwell_s"]
    assert schema.sparse_names == ["user", "item", "city", "age", "tags"] and schema.feature("tags").multi_hot
    assert sum(info.rows for info in schema.splits.values()) == len(rows) + 2


# --- libSVM / libFM ---------------------------------------------------------------------------------


def libfm_lines(n=300, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(["-1", "+1", "1", "0"])
        fields = sorted(rng.sample(range(5), rng.randint(0, 5)))
        lines.append(" ".join([label, *(f"{f}:{rng.randint(0, 30)}:1" for f in fields)]))
    return lines


def test_libfm_field_index_value(tmp_path):
    lines = libfm_lines()
    lines[10] = "2 0:1:1"  # a label that is neither -1/0/+1
    lines[20] = "1 0:1:1 0:2:1"  # field 0 twice
    lines[30] = "1 0:1"  # not field:index:value
    (tmp_path / "train.libfm").write_text("\n".join(lines) + "\n")
    record, dataset = prepare(PrepareConfig(format="libsvm", inputs=[str(tmp_path / "train.libfm")],
                                            output=str(tmp_path / "ds"), ids=IdConfig(rule="vocab"),
                                            progress=False, max_bad_fraction=0.05)), tmp_path / "ds"
    assert record["quarantined"] == {"bad_label": 1, "repeated_field": 1, "bad_feature": 1}
    schema = Schema.load(dataset)
    assert schema.sparse_names == [f"field_{f}" for f in range(5)]
    table = read_all(dataset).to_pydict()
    for position, row_id in enumerate(table["row_id"]):
        label, *tokens = lines[row_id].split()
        assert table["label"][position] == (1.0 if label in ("+1", "1") else 0.0)
        values = {int(t.split(":")[0]): int(t.split(":")[1]) for t in tokens}
        for f in range(5):
            feature = schema.feature(f"field_{f}")
            vocab = pq.read_table(dataset / feature.id_rule.vocab_file)["value"].to_pylist()
            got = table[f"field_{f}"][position]
            assert (None if got == 0 else vocab[got - 2]) == values.get(f)


def test_libsvm_index_value_with_minus_one_labels(tmp_path):
    lines = ["-1 3:1 17:1 4:0", "+1 1:1 2:0.5 # a comment", "-1", "+1\t9:1  10:1", "1 5:x"]
    (tmp_path / "a.svm").write_text("\n".join(lines) + "\n")
    source = LibSVMSource([tmp_path / "a.svm"], LibSVMOptions(max_length=1, values="presence"))
    assert source.layout == "libsvm" and source.info.multi_hot == ["features"]
    from recsys_kd.data.quarantine import Quarantine

    quarantine = Quarantine(tmp_path / "q.jsonl")
    table = pa.concat_tables([chunk.table for chunk in source.chunks(quarantine)]).to_pydict()
    quarantine.close()
    assert table == {"row_id": [0, 1, 2, 3], "label": [0.0, 1.0, 0.0, 1.0], "features": [[3], [1], [], [9]]}
    assert [json.loads(line)["line"] for line in (tmp_path / "q.jsonl").read_text().splitlines()] == [5]


# --- MovieLens genres -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_folder(shared_data):
    return shared_data / "movielens-100k-recbole"


def write_grouplens_layouts(root, folder, ratings=300):
    """ML-1M (``::``) and ML-100K (``u.*``) copies of the first ratings, users and items of RecBole's
    ml-100k files, genres written each release's way."""
    inter = recbole_rows(folder / "ml-100k.inter")[:ratings]
    users = recbole_rows(folder / "ml-100k.user")
    items = recbole_rows(folder / "ml-100k.item")
    ml1m, ml100k = root / "ml-1m", root / "ml-100k"
    ml1m.mkdir()
    ml100k.mkdir()
    (ml1m / "ratings.dat").write_text("".join(
        f"{r['user_id']}::{r['item_id']}::{int(float(r['rating']))}::{int(float(r['timestamp']))}\n" for r in inter))
    (ml1m / "users.dat").write_text("".join(
        f"{u['user_id']}::{u['gender']}::{u['age']}::{u['occupation']}::{u['zip_code']}\n" for u in users))
    (ml1m / "movies.dat").write_bytes("".join(
        f"{i['item_id']}::{i['movie_title']} ({i['release_year']})::{i['class'].replace(' ', '|')}\n" for i in items
    ).encode("iso-8859-1"))
    (ml100k / "u.data").write_text("".join(
        f"{r['user_id']}\t{r['item_id']}\t{int(float(r['rating']))}\t{int(float(r['timestamp']))}\n" for r in inter))
    (ml100k / "u.user").write_text("".join(
        f"{u['user_id']}|{u['age']}|{u['gender']}|{u['occupation']}|{u['zip_code']}\n" for u in users))
    item_lines = []
    for i in items:
        flags = "|".join("1" if g in i["class"].split() else "0" for g in ML100K_GENRES)
        date = f"01-Jan-{i['release_year']}" if i["release_year"] else ""
        item_lines.append(f"{i['item_id']}|{i['movie_title']}|{date}||http://x|{flags}\n")
    (ml100k / "u.item").write_bytes("".join(item_lines).encode("iso-8859-1"))
    return ml1m, ml100k, {i["item_id"]: i["class"].split() for i in items}


def test_genres_in_every_movielens_layout(tmp_path, ml100k_folder):
    ml1m, ml100k, genres = write_grouplens_layouts(tmp_path, ml100k_folder)
    tables = {}
    for name, folder in (("recbole", ml100k_folder), ("ml-1m", ml1m), ("ml-100k", ml100k)):
        source = MovieLensSource([folder], MovieLensOptions(genres=True))
        assert source.info.sparse[-1] == "genres" and source.info.multi_hot == ["genres"]
        table = pa.concat_tables([chunk.table for chunk in source.chunks(None)])
        tables[name] = table.drop_columns(["row_id"])
        got = dict(zip(table["item_id"].to_pylist(), table["genres"].to_pylist()))
        assert all(got[item] == genres[item] for item in got), name
        assert {g for item in got for g in got[item]} <= set(ML100K_GENRES)
    first = tables["ml-1m"]
    assert tables["ml-100k"].equals(first)
    assert tables["recbole"].slice(0, first.num_rows).equals(first)
    without = pa.concat_tables([c.table for c in MovieLensSource([ml100k]).chunks(None)])
    assert "genres" not in without.column_names and without.num_columns == first.num_columns  # row_id instead


def test_a_model_trains_on_ml100k_with_genres(tmp_path, ml100k_folder):
    data = tmp_path / "data"
    assert main(["prepare", "-c", "configs/movielens.yaml", f"prepare.inputs=[{ml100k_folder}]",
                 f"prepare.output={data}", "prepare.movielens.genres=true", "prepare.progress=false"]) == 0
    schema = Schema.load(data)
    genres = schema.feature("genres")
    assert genres.multi_hot and genres.num_embeddings == 19 + 2  # 19 genres + missing and OOV ids
    lengths = [len(ids) for ids in read_split(data, "train")["genres"].to_pylist()]
    assert max(lengths) > 1 and min(lengths) >= 1
    out = tmp_path / "dnn"
    assert main(["train", "-c", "configs/movielens.yaml", f"prepare.output={data}", f"train.output={out}",
                 "train.model.name=dnn", "train.model.mlp_layers=[32]", "train.epochs=1", "train.max_steps=25",
                 "train.progress=false"]) == 0
    record = json.loads((out / "train.json").read_text())
    assert 0.6 < record["test"]["auc"] < 1
    assert record["parameters"]["embedding"] >= sum(f.num_embeddings for f in schema.sparse) * 16
    # score reads raw MovieLens logs for this schema with its genres (the converter options prepare used)
    from recsys_kd.export.score import _open_raw

    assert _open_raw(schema, ml100k_folder).info.sparse == schema.sparse_names
