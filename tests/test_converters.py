"""Avazu and MovieLens converters on the real samples (the first 9,000 lines of Avazu's train.csv, and
MovieLens-100K in RecBole's atomic files; the ``shared_data`` fixture finds them), checked against
direct computations from the raw files, plus planted bad rows and a GroupLens-format fixture."""

import collections
import csv
import datetime
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_kd.data.avazu import HEADER, SPARSE_FEATURES, AvazuSource, hour_fields
from recsys_kd.data.ids import hash_ids
from recsys_kd.data.movielens import FEATURES, MovieLensSource
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.quarantine import Quarantine, TooManyBadRows
from recsys_kd.data.schema import MISSING_ID, OOV_ID, Schema
from recsys_kd.data.split import SplitConfig
from tests.helpers import read_split

AVAZU_COLUMNS = HEADER.split(",")


def read_all(dataset):
    """Every split of a prepared dataset as one table, by row_id."""
    schema = Schema.load(dataset)
    tables = [read_split(dataset, split) for split, info in schema.splits.items() if info.files]
    return pa.concat_tables(tables).sort_by("row_id")


def run(tmp_path, format, inputs, name="ds", **options):
    config = PrepareConfig(
        format=format, inputs=[str(p) for p in inputs], output=str(tmp_path / name), progress=False, **options
    )
    return prepare(config), tmp_path / name


def csv_lines(path):
    """Every physical line of a CSV file, split (the header too, so list index = line index)."""
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def concat(source, quarantine=None):
    return pa.concat_tables([chunk.table for chunk in source.chunks(quarantine)])


@pytest.fixture(scope="module")
def avazu(shared_data):
    return shared_data / "avazu-sample"


# --- Avazu --------------------------------------------------------------------------------------


def test_avazu_union_matches_raw_file(tmp_path, avazu):
    path = avazu / "avazu_union.csv"
    lines = csv_lines(path)
    assert lines[0] == AVAZU_COLUMNS
    record, dataset = run(tmp_path, "avazu", [path], ids=IdConfig(num_embeddings=1000, seed=3))
    assert sum(record["rows"].values()) + record["quarantined_total"] == len(lines) - 1 == 8999
    assert record["quarantined_total"] == 0
    assert sum(record["positives"].values()) == sum(line[1] == "1" for line in lines[1:])
    schema = Schema.load(dataset)
    assert schema.sparse_names == SPARSE_FEATURES and len(schema.sparse) == 23 and not schema.dense
    table = read_all(dataset)
    row_ids = table["row_id"].to_numpy()
    np.testing.assert_array_equal(row_ids, np.arange(1, 9000))  # line 0 is the header
    assert table["label"].to_pylist() == [float(lines[i][1]) for i in row_ids]
    for name in ("site_id", "device_ip", "C14", "banner_pos"):
        column = AVAZU_COLUMNS.index(name)
        values = pa.array([lines[i][column] or None for i in row_ids], pa.string())
        expected = hash_ids(values, 1000, schema.feature(name).id_rule.seed)
        np.testing.assert_array_equal(table[name].to_numpy(), expected)


def test_hour_fields_match_datetime(avazu):
    sample = [line[2] for line in csv_lines(avazu / "avazu_union.csv")[1:]]
    every_hour = [
        f"{y:02d}{m:02d}{d:02d}{h:02d}"
        for y in (14, 15, 16) for m in range(1, 13) for d in range(1, 32) for h in range(24)
    ]
    random_digits = [f"{v:08d}" for v in np.random.RandomState(0).randint(0, 10**8, size=3000)]
    odd = ["16022900", "15022900", "14000100", "14130100", "14103100", "14113100", "14102124", "1410210",
           "141021001", "", "14x02100", " 4102100", "99123123", "00010100"]
    texts = sample + every_hour + random_digits + odd
    got = hour_fields(pa.array([t.encode() for t in texts], pa.binary()))
    epoch = datetime.date(1970, 1, 1)
    for index, text in enumerate(texts):
        try:
            assert len(text) == 8 and text.isdigit()
            moment = datetime.datetime(2000 + int(text[:2]), int(text[2:4]), int(text[4:6]), int(text[6:]))
        except (AssertionError, ValueError):
            assert not got.valid[index], text
            continue
        assert got.valid[index], text
        assert got.hour_of_day[index] == moment.hour, text
        assert got.weekday[index] == moment.weekday(), text
        assert got.day[index] == (moment.date() - epoch).days, text
    assert got.valid.sum() > len(sample) + len(every_hour) // 2  # the grid is mostly real dates


def test_avazu_split_files_with_and_without_header(tmp_path, avazu):
    train = avazu / "wide_resdnn_train.csv"
    dev, test = avazu / "wide_resdnn_dev_noheader.csv", avazu / "wide_resdnn_test_noheader.csv"
    record, dataset = run(tmp_path, "avazu", [dev, test])
    assert sum(record["rows"].values()) == 480 + 432 and record["quarantined_total"] == 0
    raw = csv_lines(dev) + csv_lines(test)
    assert sum(record["positives"].values()) == sum(line[1] == "1" for line in raw)
    np.testing.assert_array_equal(read_all(dataset)["row_id"].to_numpy(), np.arange(912))
    # train (with header) + dev + test hold the same rows as the union file, header aside.
    table = concat(AvazuSource([train, dev, test]))
    union = concat(AvazuSource([avazu / "avazu_union.csv"]))
    assert table.num_rows == union.num_rows == 8999
    assert table["row_id"].to_pylist() == list(range(1, 9000))
    key = ["label", "device_ip", "device_id", "C14"]
    assert sorted(zip(*[table[k].to_pylist() for k in key])) == sorted(zip(*[union[k].to_pylist() for k in key]))


def test_avazu_gzip_input_with_header_and_day_column(tmp_path, avazu):
    path = tmp_path / "train.csv.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(HEADER.encode() + b"\n" + (avazu / "wide_resdnn_dev_noheader.csv").read_bytes())
    table = concat(AvazuSource([path]))
    assert table["row_id"].to_pylist() == list(range(1, 481))
    assert set(table["day"].to_pylist()) == {(datetime.date(2014, 10, 21) - datetime.date(1970, 1, 1)).days}


def test_avazu_vocab_min_count_5(tmp_path, avazu):
    lines = csv_lines(avazu / "avazu_union.csv")
    record, dataset = run(tmp_path, "avazu", [avazu / "avazu_union.csv"], ids=IdConfig(rule="vocab", min_count=5))
    table = read_all(dataset)
    row_ids = table["row_id"].to_pylist()
    schema = Schema.load(dataset)
    oov_seen = 0
    for name in ("device_ip", "site_id", "app_id", "device_model", "C14"):
        column = AVAZU_COLUMNS.index(name)
        counts = collections.Counter(line[column] for line in lines[1:])
        vocab = pq.read_table(dataset / "vocab" / f"{name}.parquet").to_pydict()
        assert set(vocab["value"]) == {v for v, c in counts.items() if c >= 5 and v}
        assert schema.feature(name).num_embeddings == len(vocab["value"]) + 2
        id_of = dict(zip(vocab["value"], vocab["id"]))
        for row_id, got in zip(row_ids, table[name].to_pylist()):
            value = lines[row_id][column]
            assert got == (MISSING_ID if not value else id_of[value] if counts[value] >= 5 else OOV_ID)
        oov_seen += sum(got == OOV_ID for got in table[name].to_pylist())
    assert oov_seen > 1000  # device_ip alone has thousands of values seen fewer than 5 times
    # Every sample row is from 2014-10-21 00:00, a Tuesday.
    assert pq.read_table(dataset / "vocab" / "hour_of_day.parquet")["value"].to_pylist() == [0]
    assert pq.read_table(dataset / "vocab" / "weekday.parquet")["value"].to_pylist() == [1]


def planted_avazu(tmp_path, avazu):
    lines = (avazu / "avazu_union.csv").read_bytes().splitlines(keepends=True)[:201]  # header + 200 rows
    fields = lines[5].rstrip(b"\n").split(b",")

    def row(**changes):
        values = list(fields)
        for name, value in changes.items():
            values[AVAZU_COLUMNS.index(name)] = value
        return b",".join(values) + b"\n"

    planted = {  # line index -> (reason, line)
        7: ("wrong_column_count", b",".join(fields[:20]) + b"\n"),
        12: ("bad_hour", row(hour=b"14023000")),          # February 30th
        20: ("bad_hour", row(hour=b"1410210")),           # 7 digits
        33: ("bad_label", row(click=b"2")),
        41: ("invalid_utf8:site_id", row(site_id=b"\xff\xfe01")),
        50: ("bad_token:app_id", row(app_id=b"ab cd")),
        60: ("wrong_column_count", b"\n"),                 # empty line
    }
    path = tmp_path / "planted.csv"
    path.write_bytes(b"".join(planted[i][1] if i in planted else line for i, line in enumerate(lines)))
    return path, planted


def test_avazu_quarantine_counts_reasons_with_line_numbers(tmp_path, avazu):
    path, planted = planted_avazu(tmp_path, avazu)
    record, dataset = run(tmp_path, "avazu", [path], max_bad_fraction=0.5)
    assert sum(record["rows"].values()) == 200 - len(planted)
    assert record["quarantined"] == dict(collections.Counter(reason for reason, _ in planted.values()))
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert {e["line"]: e["reason"] for e in entries} == {i + 1: reason for i, (reason, _) in planted.items()}
    assert all(e["file"] == str(path) for e in entries)
    assert set(read_all(dataset)["row_id"].to_pylist()) == set(range(1, 201)) - set(planted)


def test_avazu_too_many_bad_rows_fails_and_leaves_nothing(tmp_path, avazu):
    path, planted = planted_avazu(tmp_path, avazu)
    with pytest.raises(TooManyBadRows, match=r"7 of 200 rows"):
        run(tmp_path, "avazu", [path], max_bad_fraction=0.01)
    with pytest.raises(TooManyBadRows):
        run(tmp_path, "avazu", [path], max_bad_fraction=0.01, ids=IdConfig(rule="vocab"))
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_avazu_unlabelled_kaggle_test_file_is_refused(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(HEADER.replace("click,", "") + "\n")
    with pytest.raises(ValueError, match="no 'click' column"):
        concat(AvazuSource([path]))


# --- MovieLens ----------------------------------------------------------------------------------


def recbole_rows(path):
    """Data rows of a RecBole atomic file as dicts keyed by the untyped column name."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = [column.split(":")[0] for column in rows[0]]
    return [dict(zip(names, row)) for row in rows[1:]]


@pytest.fixture(scope="module")
def ml100k(shared_data):
    folder = shared_data / "movielens-100k-recbole"
    return folder, recbole_rows(folder / "ml-100k.inter")


@pytest.fixture(scope="module")
def ml100k_dataset(tmp_path_factory, ml100k):
    folder, _ = ml100k
    split = SplitConfig(method="permutation", seed=2022, fractions=[0.8, 0.1, 0.1])
    return run(tmp_path_factory.mktemp("ml100k"), "movielens", [folder], split=split)


def test_movielens_recbole_counts_and_peer_split(ml100k, ml100k_dataset):
    _, ratings = ml100k
    record, dataset = ml100k_dataset
    assert len(ratings) == 100_000
    kept = [line for line, r in enumerate(ratings, start=1) if float(r["rating"]) != 3]  # row_id = physical line
    assert len(kept) == 72_855
    assert record["dropped_by_rule"] == {"rating_3": 27_145} and record["quarantined_total"] == 0
    assert record["rows"] == {"train": 58_284, "valid": 7_285, "test": 7_286}
    assert sum(record["positives"].values()) == sum(float(r["rating"]) >= 4 for r in ratings)
    schema = Schema.load(dataset)
    assert schema.sparse_names == FEATURES and len(FEATURES) == 7
    # The split FuxiCTR / RecBole made for the peer figures: kept rows in file order, permuted.
    permutation = np.random.RandomState(2022).permutation(72_855)
    for split, (start, stop) in {"train": (0, 58_284), "valid": (58_284, 65_569), "test": (65_569, 72_855)}.items():
        assert set(read_split(dataset, split)["row_id"].to_pylist()) == {kept[i] for i in permutation[start:stop]}


def test_movielens_recbole_rows_join_user_and_item_files(ml100k):
    folder, ratings = ml100k
    source = MovieLensSource([folder])
    table = concat(source)
    users = {u["user_id"]: u for u in recbole_rows(folder / "ml-100k.user")}
    items = {i["item_id"]: i for i in recbole_rows(folder / "ml-100k.item")}
    got = table.to_pydict()
    for index, row_id in enumerate(got["row_id"]):
        rating = ratings[row_id - 1]
        user, item = users[rating["user_id"]], items[rating["item_id"]]
        assert got["label"][index] == (1.0 if float(rating["rating"]) >= 4 else 0.0)
        assert (got["user_id"][index], got["item_id"][index]) == (rating["user_id"], rating["item_id"])
        assert [got[f][index] for f in ("age", "gender", "occupation", "zip_code")] == [
            user["age"], user["gender"], user["occupation"], user["zip_code"]
        ]
        assert got["release_year"][index] == (item["release_year"] or None)
    assert source.dropped_by_rule == {"rating_3": 27_145}


def test_sources_yield_identical_rows_on_a_second_pass_and_any_block_size(tmp_path, ml100k, avazu):
    union = avazu / "avazu_union.csv"
    sources = [
        (MovieLensSource([ml100k[0]]), MovieLensSource([ml100k[0]], block_bytes=50_000)),
        (AvazuSource([union]), AvazuSource([union], block_bytes=50_000)),
    ]
    for source, small_blocks in sources:
        quarantine = Quarantine(tmp_path / "q.jsonl")
        first = concat(source, quarantine)
        dropped = dict(source.dropped_by_rule)
        assert concat(source).equals(first)
        assert source.dropped_by_rule == dropped
        assert concat(small_blocks).equals(first)
        assert small_blocks.dropped_by_rule == dropped


def write_grouplens(tmp_path, folder, ratings, cafe_item, rows=400):
    """A GroupLens ML-1M-shaped copy of the first ``rows`` ml-100k ratings plus planted lines, the
    title of ``cafe_item`` made "Café (YYYY)"; returns the directory, the ratings lines and
    {0-based line: (reason, text)} of the planted lines."""
    out = tmp_path / "ml-1m"
    out.mkdir()
    users = recbole_rows(folder / "ml-100k.user")
    (out / "users.dat").write_bytes("".join(
        f"{u['user_id']}::{u['gender']}::{u['age']}::{u['occupation']}::{u['zip_code']}\n" for u in users
    ).encode("iso-8859-1"))
    movies = []
    for item in recbole_rows(folder / "ml-100k.item"):
        title = "Café" if item["item_id"] == cafe_item else item["movie_title"]
        year = f" ({item['release_year']})" if item["release_year"].isdigit() else ""
        movies.append(f"{item['item_id']}::{title}{year}::{item['class'].replace(' ', '|')}\n")
    (out / "movies.dat").write_bytes("".join(movies).encode("iso-8859-1"))
    lines = [
        f"{r['user_id']}::{r['item_id']}::{int(float(r['rating']))}::{int(float(r['timestamp']))}"
        for r in ratings[:rows]
    ]
    lines.append("1::267::5::874965758")  # item 267's title has no year: release_year missing
    planted = {
        10: ("wrong_column_count", "1::2::3"),
        50: ("unknown_user", "9999::1::5::881250949"),
        100: ("unknown_item", "1::99999::4::881250949"),
        150: ("bad_rating", "1::1::6::881250949"),
        200: ("bad_rating", "1::1::five::881250949"),
        250: ("wrong_column_count", "1:::1::5::881250949"),
        300: ("wrong_column_count", "1:2:3::5::881250949"),  # 7 ':'-fields, but not 4 '::'-fields
    }
    for index in sorted(planted):
        lines.insert(index, planted[index][1])
    (out / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("iso-8859-1"))
    return out, lines, planted


def test_movielens_grouplens_files(tmp_path, ml100k):
    folder, ratings = ml100k
    cafe = next(r["item_id"] for r in ratings if float(r["rating"]) != 3)
    out, lines, planted = write_grouplens(tmp_path, folder, ratings, cafe)
    assert "é".encode("iso-8859-1") in (out / "movies.dat").read_bytes()
    files = [out / "ratings.dat", out / "users.dat", out / "movies.dat"]
    record, dataset = run(tmp_path, "movielens", files, max_bad_fraction=0.05)
    valid = {i: line.split("::") for i, line in enumerate(lines) if i not in planted}
    kept = {i: int(parts[2]) for i, parts in valid.items() if int(parts[2]) != 3}
    assert record["quarantined"] == dict(collections.Counter(reason for reason, _ in planted.values()))
    assert record["dropped_by_rule"] == {"rating_3": len(valid) - len(kept)}
    assert sum(record["rows"].values()) == len(kept)
    assert sum(record["positives"].values()) == sum(r >= 4 for r in kept.values())
    assert Schema.load(dataset).sparse_names == FEATURES
    entries = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    assert {e["line"]: (e["reason"], e["text"]) for e in entries} == {i + 1: planted[i] for i in planted}

    table = concat(MovieLensSource([out]))
    assert table["row_id"].to_pylist() == sorted(kept)
    assert table["label"].to_pylist() == [1.0 if kept[i] >= 4 else 0.0 for i in sorted(kept)]
    years = {i: year for i, year in zip(table["item_id"].to_pylist(), table["release_year"].to_pylist())}
    items = {i["item_id"]: i for i in recbole_rows(folder / "ml-100k.item")}
    assert years[cafe] == items[cafe]["release_year"]  # from the latin-1 title "Café (YYYY)"
    assert years["267"] is None
    assert all(years[i] == items[i]["release_year"] for i in years if i != "267")
    users = {u["user_id"]: u for u in recbole_rows(folder / "ml-100k.user")}
    first = table.slice(0, 1).to_pylist()[0]
    assert first["zip_code"] == users[first["user_id"]]["zip_code"]
    assert first["occupation"] == users[first["user_id"]]["occupation"]


def test_movielens_missing_side_file_is_an_error(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1::5::0\n")
    with pytest.raises(FileNotFoundError, match="users.dat and movies.dat"):
        MovieLensSource([tmp_path])
