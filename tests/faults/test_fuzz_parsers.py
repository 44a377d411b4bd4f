"""Fuzzing the raw-log parsers of every format: Criteo TSV (Kaggle ``train.txt``), Criteo 1TB ``day_N``
(plain and .gz), Avazu CSV, MovieLens GroupLens ``::`` (``ratings.dat``) and RecBole atomic
(``.inter``), users' own tables (``format: table``, CSV and JSON lines) and libSVM / libFM files.

Each example is a file of generated lines: real sample lines, the same with one field mutated (emptied,
random or non-UTF-8 bytes, huge or negative numbers, NaN, an extra or a missing separator, a runaway
field), random bytes, lines of the wrong column count, empty lines, Windows line endings. The property:
no exception escapes, and every line is accounted for exactly once: converted (its ``row_id`` is its
line index), quarantined (its 1-based line number; ``quarantine.jsonl`` has one JSON line per row
even when the text holds Unicode line separators), a header, or dropped by the format's labelling
rule (MovieLens rating 3).

The default suite runs 200 examples per format (up to 30 lines each: a few thousand lines per format,
the same examples every run, ~23 s in all), 50 for the table and libSVM formats; ``-m slow`` runs 1,500 random examples per format (~20,000
lines each, ~3 min in all).
"""

import dataclasses
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_kd.data.avazu import AvazuSource
from recsys_kd.data.criteo import CriteoOptions, CriteoSource
from recsys_kd.data.libsvm import LibSVMOptions, LibSVMSource
from recsys_kd.data.movielens import MovieLensSource
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import MAX_LINE_BYTES
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.table import TableSource
from recsys_kd.data.table_spec import DenseColumn, LabelRule, MultiHotColumn, TableOptions, TimeColumn

TALLY = "RECSYS_KD_FUZZ_TALLY"  # a file each example appends its line count to
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)
SLOW = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=HEALTH)

RUNAWAY = b"7" * (MAX_LINE_BYTES + 100)  # quarantined as field_too_long
HUGE = b"9" * (2 * MAX_LINE_BYTES + 100)  # longer than a small block's buffer: skipped as it streams
FIELD_VALUES = st.one_of(
    st.just(b""), st.binary(max_size=12), st.sampled_from([
        b"0", b"1", b"-1", b"2", b"-9223372036854775808", b"9" * 30, b"1e308", b"nan", b"NaN", b"inf", b"-0",
        b"\xff\xfe", b"caf\xe9", "café".encode(), b"0x1f", b" 1", b"1 ", b"\r", b"\x00", b"a\rb", b"\"q\"",
        b"68fd1e64", b"FFFFFFFFFFFFFFFFF", b"3.5", b"14102100", b"14023000", b"99123123",
    ]),
)


def _lines(valid: List[bytes], separator: bytes, columns: int) -> st.SearchStrategy:
    """One generated line (no newline)."""
    def mutate(line: bytes, index: int, value: bytes, how: str) -> bytes:
        fields = line.split(separator)
        index %= len(fields)
        if how == "replace":
            fields[index] = value
        elif how == "insert":
            fields.insert(index, value)
        elif how == "delete":
            del fields[index]
        else:  # truncate the line
            return line[: index * 3]
        return separator.join(fields)

    mutated = st.builds(mutate, st.sampled_from(valid), st.integers(0, 60), FIELD_VALUES,
                        st.sampled_from(["replace", "replace", "replace", "insert", "delete", "truncate"]))
    wrong_count = st.builds(lambda n, value: separator.join([value] * n), st.integers(0, columns + 3), FIELD_VALUES)
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid).map(lambda line: line + b"\r"), mutated, mutated,
        st.binary(max_size=300), wrong_count, st.just(b""),
    )


def _text(draw, valid, separator, columns, max_lines) -> bytes:
    lines = draw(st.lists(_lines(valid, separator, columns), min_size=max_lines // 4, max_size=max_lines))
    # one example in three has a runaway field (costly: a few in every example would dominate the time)
    runaway = draw(st.sampled_from([None, None, None, None, RUNAWAY, HUGE]))
    if runaway is not None:
        fields = draw(st.sampled_from(valid)).split(separator)
        fields[draw(st.integers(0, len(fields) - 1))] = runaway
        lines.insert(draw(st.integers(0, len(lines))), separator.join(fields))
    body = b"\n".join(lines)
    return body + (b"\n" if draw(st.booleans()) else b"")


def _line_count(data: bytes) -> int:
    """Physical lines as the reader counts them: a final line without a newline counts too."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def _account(source, path_lines: Dict[str, int], headers: int, quarantine_dir: Path, row_id_offset: int = 0) -> None:
    """Runs the source to the end; asserts every line is converted, quarantined, a header or dropped.
    ``row_id_offset``: a row's line index minus its row_id (1 for a table's CSV, whose header has none)."""
    quarantine = Quarantine(quarantine_dir / "quarantine.jsonl")
    converted: List[np.ndarray] = []
    for chunk in source.chunks(quarantine):
        converted.append(chunk.table.column("row_id").to_numpy())
        assert chunk.table.num_rows == 0 or chunk.table.column("label").null_count == 0
    quarantine.close()
    row_ids = (np.concatenate(converted) if converted else np.zeros(0, np.int64)) + row_id_offset
    entries = [json.loads(line) for line in (quarantine_dir / "quarantine.jsonl").read_text("utf-8").splitlines()]
    quarantined = np.array([entry["line"] - 1 for entry in entries], np.int64)
    assert len(entries) == quarantine.total and not np.intersect1d(quarantined, row_ids).size
    dropped = sum(source.dropped_by_rule.values())
    total = sum(path_lines.values())
    assert len(row_ids) + quarantine.total + headers + dropped == total, (
        len(row_ids), quarantine.summary(), headers, dropped, total)
    assert len(np.unique(row_ids)) == len(row_ids) and (row_ids.size == 0 or 0 <= row_ids.min() <= row_ids.max() < total)
    if os.environ.get(TALLY):  # tools/chaos.py counts the lines fuzzed
        with open(os.environ[TALLY], "a", encoding="utf-8") as tally:
            tally.write(f"{total}\n")


@pytest.fixture(scope="module")
def samples(shared_data) -> Dict[str, List[bytes]]:
    def first(path: Path, count: int, skip: int = 0) -> List[bytes]:
        return path.read_bytes().splitlines()[skip:skip + count]

    ml = shared_data / "movielens-100k-recbole"
    return {
        "criteo": first(shared_data / "criteo-kaggle-sample" / "criteo_kaggle_union.txt", 200),
        "avazu": first(shared_data / "avazu-sample" / "avazu_union.csv", 200, skip=1),
        "avazu_header": first(shared_data / "avazu-sample" / "avazu_union.csv", 1),
        "recbole": first(ml / "ml-100k.inter", 200, skip=1),
        "recbole_header": first(ml / "ml-100k.inter", 1),
        "grouplens": [b"%d::%d::%d::97830%04d" % (u, i, r, u * i) for u in range(1, 7) for i in range(1, 6)
                      for r in (1, 3, 5)],
        "table": [b"%d,u%d,%.2f,%d,a|b%s,17000%05d,K\xc3\xb6ln" % (i % 2, i, i * 1.5, i % 90, b"|c" * (i % 3), i)
                  for i in range(40)]
                 # quoted fields (RFC 4180): a separator, a doubled quote, quoted numbers, an empty one
                 + [b'"%d","u,%d",%.2f,"%d","a|""b""",17000%05d,""' % (i % 2, i, i * 1.5, i % 90, i) for i in range(10)],
        "jsonl": [json.dumps({"clicked": i % 2, "user": f"u{i}", "price": i * 1.5, "age": i % 90,
                              "tags": ["a", "b"] if i % 2 else "a|c", "ts": 1_700_000_000 + i}).encode()
                  for i in range(40)],
        "libsvm": [b"%s %d:1 %d:1" % ([b"-1", b"+1", b"0", b"1"][i % 4], i, i + 50) for i in range(40)],
        "libfm": [b"%s 0:%d:1 1:%d:1 2:%d:1" % ([b"-1", b"+1"][i % 2], i, i % 7, i % 3) for i in range(40)],
    }


@pytest.fixture(scope="module")
def grouplens_dir(tmp_path_factory) -> Path:
    """users.dat and movies.dat of users 1-6 and movies 1-5 (one title without a year, latin-1 bytes)."""
    folder = tmp_path_factory.mktemp("grouplens")
    (folder / "users.dat").write_bytes(b"".join(b"%d::%s::25::4::0211%d\n" % (u, b"MF"[u % 2:u % 2 + 1], u)
                                                for u in range(1, 7)))
    titles = [b"Toy Story (1995)", b"Caf\xe9 (1999)", b"No Year", b"Heat (1995)", b"X (2000)"]
    (folder / "movies.dat").write_bytes(b"".join(b"%d::%s::Drama\n" % (i, t) for i, t in enumerate(titles, 1)))
    return folder


@pytest.fixture(scope="module")
def recbole_dir(tmp_path_factory, shared_data) -> Path:
    folder = tmp_path_factory.mktemp("recbole")
    for name in ("ml-100k.user", "ml-100k.item"):
        (folder / name).write_bytes((shared_data / "movielens-100k-recbole" / name).read_bytes())
    return folder


BLOCKS = st.sampled_from([2048, 16 << 20, 16 << 20, 16 << 20])  # 2 KiB: a few lines a block, long ones grow the buffer


def _fuzz_criteo(samples, draw, day: Optional[str], compressed: bool) -> None:
    data = _text(draw, samples["criteo"], b"\t", 40, 30)
    with tempfile.TemporaryDirectory() as folder:
        name = (day or "train.txt") + (".gz" if compressed else "")
        path = Path(folder) / name
        path.write_bytes(gzip.compress(data, compresslevel=1) if compressed else data)
        options = CriteoOptions(integers=draw(st.sampled_from(["log", "bucketize"])))
        source = CriteoSource([path], options, block_bytes=draw(BLOCKS))
        _account(source, {name: _line_count(data)}, 0, Path(folder))


def _fuzz_avazu(samples, draw) -> None:
    header = draw(st.booleans())
    data = _text(draw, samples["avazu"], b",", 24, 30)
    first = samples["avazu_header"][0] if header else draw(st.sampled_from(samples["avazu"]))
    data = first + b"\n" + data
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.csv"
        path.write_bytes(data)
        _account(AvazuSource([path], block_bytes=draw(BLOCKS)), {"train.csv": _line_count(data)}, int(header), Path(folder))


def _fuzz_movielens(samples, draw, folder: Path, layout: str) -> None:
    if layout == "grouplens":
        data = _text(draw, samples["grouplens"], b"::", 4, 30)
        ratings, headers = folder / "ratings.dat", 0
    else:
        data = samples["recbole_header"][0] + b"\n" + _text(draw, samples["recbole"], b"\t", 4, 30)
        ratings, headers = folder / "ml-100k.inter", 1
    ratings.write_bytes(data)
    with tempfile.TemporaryDirectory() as scratch:
        _account(MovieLensSource([folder], block_bytes=draw(BLOCKS)), {ratings.name: _line_count(data)}, headers,
                 Path(scratch))


TABLE_HEADER = b"clicked,user,price,age,tags,ts,city"
TABLE_SPEC = TableOptions(
    label=LabelRule(column="clicked"),
    dense=[DenseColumn("price", transform="standardize"), DenseColumn("age", transform="bucketize", boundaries=[18, 40])],
    sparse=["user"], multi_hot=[MultiHotColumn("tags", max_length=2)], time=TimeColumn("ts"),
)


def _fuzz_table(samples, draw, kind: str) -> None:
    if kind == "csv":
        data = TABLE_HEADER + b"\n" + _text(draw, samples["table"], b",", 7, 30)
        spec, name, headers = dataclasses.replace(TABLE_SPEC, sparse=["user", "city"]), "logs.csv", 1
    else:
        data = _text(draw, samples["jsonl"], b",", 6, 30)
        spec, name, headers = TABLE_SPEC, "logs.jsonl", 0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        source = TableSource([path], spec, SplitConfig(), block_bytes=draw(BLOCKS))
        _account(source, {name: _line_count(data)}, headers, Path(folder), row_id_offset=headers)


def _fuzz_libsvm(samples, draw) -> None:
    layout = draw(st.sampled_from(["libsvm", "libfm"]))
    data = _text(draw, samples[layout], b" ", 4, 30)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.txt"
        path.write_bytes(data)
        options = LibSVMOptions(layout=layout, fields=[0, 1, 2] if layout == "libfm" else [])
        _account(LibSVMSource([path], options, block_bytes=draw(BLOCKS)), {path.name: _line_count(data)}, 0, Path(folder))


# --- the default suite: ~200 examples per format ------------------------------------------------------


@FAST
@given(st.data())
def test_fuzz_criteo_tsv(samples, data):
    _fuzz_criteo(samples, data.draw, None, False)


@FAST
@given(st.data())
def test_fuzz_criteo_1tb_day_files(samples, data):
    _fuzz_criteo(samples, data.draw, "day_3", data.draw(st.booleans()))


@FAST
@given(st.data())
def test_fuzz_avazu_csv(samples, data):
    _fuzz_avazu(samples, data.draw)


@FAST
@given(st.data())
def test_fuzz_movielens_grouplens_dat(samples, grouplens_dir, data):
    _fuzz_movielens(samples, data.draw, grouplens_dir, "grouplens")


@FAST
@given(st.data())
def test_fuzz_movielens_recbole_atomic(samples, recbole_dir, data):
    _fuzz_movielens(samples, data.draw, recbole_dir, "recbole")


TABLES = settings(FAST, max_examples=50)


@TABLES
@given(st.data())
def test_fuzz_table_csv(samples, data):
    _fuzz_table(samples, data.draw, "csv")


@TABLES
@given(st.data())
def test_fuzz_table_jsonl(samples, data):
    _fuzz_table(samples, data.draw, "jsonl")


@TABLES
@given(st.data())
def test_fuzz_libsvm_and_libfm(samples, data):
    _fuzz_libsvm(samples, data.draw)


# --- the larger run: 1,500 random examples per format ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["criteo", "day", "avazu", "grouplens", "recbole", "csv", "jsonl", "libsvm"])
@SLOW
@given(data=st.data())
def test_fuzz_every_format_longer(samples, grouplens_dir, recbole_dir, kind, data):
    if kind in ("criteo", "day"):
        _fuzz_criteo(samples, data.draw, "day_0" if kind == "day" else None, kind == "day" and data.draw(st.booleans()))
    elif kind == "avazu":
        _fuzz_avazu(samples, data.draw)
    elif kind in ("csv", "jsonl"):
        _fuzz_table(samples, data.draw, kind)
    elif kind == "libsvm":
        _fuzz_libsvm(samples, data.draw)
    else:
        _fuzz_movielens(samples, data.draw, grouplens_dir if kind == "grouplens" else recbole_dir, kind)
