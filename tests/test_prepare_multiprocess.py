"""``prepare`` on 2 gloo ranks writes the dataset 1 process writes: row for row, ids, splits,
vocabularies and quarantine, for Criteo, Avazu, MovieLens (with genres too), libFM and table inputs
(a quoted CSV, TSV, gzipped JSON lines and Parquet in one input, standardize statistics fitted over the ranks), hash
and vocabulary ids and every split method; a rank's failure fails both ranks and publishes nothing.

All 2-rank runs happen in one spawned pair of processes (one launch for every config,
:func:`tests.ranks.call_on_ranks`); the 1-process references run here."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Dict

import pyarrow.parquet as pq
import pytest

import pyarrow as pa

from recsys_kd.config import from_dict, to_dict
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import count_lines, read_delimited
from recsys_kd.data.schema import Schema
from recsys_kd.data.sections import deal_files, place
from recsys_kd.data.split import SPLITS, SplitConfig
from recsys_kd.data.table import TableSource
from tests.helpers import read_split
from tests.ranks import call_on_ranks
from tests.test_table_format import (logical_rows, quoted_rows, spec as table_spec, write_delimited, write_jsonl,
                                     write_parquet, write_quoted)

WORLD_SIZE = 2
SMALL_BLOCKS = {"block_bytes": 65536, "row_group_rows": 500, "rows_per_part": 1000, "progress": False}
BAD_CRITEO_LINES = ["1\tnot\tenough\tcolumns", "0" + "\t" * 13 + "\tzz" + "\t" * 25, "2" + "\t" * 39]
BAD_TABLE_LINES = ["1,2,3\n", "2,7,1.0,30,4.5,a,1700000000,Paris\n", "0,7,x,30,4.5,a,1700000000,Paris\n",
                   '1,7,1.0,30,4.5,a,1700000000,"Paris\n', '1,7,1.0,30,4.5,"a"b,1700000000,Paris\n']


def write_table_inputs(folder: Path) -> None:
    """One input of the four file formats: gzipped JSON lines (dealt whole), a plain CSV with a header,
    quoted fields (RFC 4180: separators and quotes in values) and bad rows (cut inside by 2 ranks),
    Parquet in row groups of 97 rows, a plain TSV."""
    folder.mkdir()
    rows = logical_rows()
    write_jsonl(folder / "a.jsonl.gz", rows[:60])
    write_quoted(folder / "b.csv", quoted_rows(rows) * 3, ",")
    with open(folder / "b.csv", "r+") as handle:
        lines = handle.readlines()
        handle.seek(0)
        handle.writelines(lines[:500] + BAD_TABLE_LINES + lines[500:])
    write_parquet(folder / "c.parquet", rows)
    write_delimited(folder / "d.tsv", rows[:100], "\t")


def write_inputs(shared: Path, root: Path) -> Dict[str, Dict]:
    """Small real inputs (bad lines added) and the configs run on them, by name."""
    criteo = (shared / "criteo-kaggle-sample" / "criteo_kaggle_union.txt").read_text().splitlines(keepends=True)
    (root / "criteo").mkdir()
    day_0 = criteo[:40] + [line + "\n" for line in BAD_CRITEO_LINES * 4] + criteo[40:2600]
    (root / "criteo" / "day_0").write_text("".join(day_0))
    with gzip.open(root / "criteo" / "day_1.gz", "wt") as handle:
        handle.write("".join(criteo[2600:3400]))
    shutil.copytree(root / "criteo", root / "criteo_truncated")
    gz = (root / "criteo" / "day_1.gz").read_bytes()
    (root / "criteo_truncated" / "day_1.gz").write_bytes(gz[: len(gz) // 2])

    avazu = shared / "avazu-sample"
    (root / "avazu").mkdir()
    train = (avazu / "wide_resdnn_train.csv").read_text().splitlines(keepends=True)
    (root / "avazu" / "a.csv").write_text("".join(train[:1500] + ["1,2,3\n"] + train[1500:2500]))
    shutil.copy(avazu / "wide_resdnn_dev_noheader.csv", root / "avazu" / "b.csv")

    movielens = shared / "movielens-100k-recbole"
    (root / "movielens").mkdir()
    ratings = (movielens / "ml-100k.inter").read_text().splitlines(keepends=True)
    (root / "movielens" / "ml.inter").write_text("".join(ratings[:3000] + ["x\ty\n"] + ratings[3000:5000]))
    for suffix in ("user", "item"):
        shutil.copy(movielens / f"ml-100k.{suffix}", root / "movielens" / f"ml.{suffix}")

    (root / "libfm").mkdir()
    libfm = [f"{'+1' if i % 3 else '-1'} 0:{i % 37}:1 1:{i % 11}:1" + (f" 2:{i % 5}:1" if i % 4 else "") for i in range(3000)]
    libfm[1234] = "1 0:1:1 0:2:1"  # a repeated field: quarantined
    (root / "libfm" / "train.libfm").write_text("\n".join(libfm[:2000]) + "\n")
    (root / "libfm" / "test.libfm").write_text("\n".join(libfm[2000:]) + "\n")

    write_table_inputs(root / "table")
    table = to_dict(table_spec())

    criteo_inputs = [str(root / "criteo" / "day_0"), str(root / "criteo" / "day_1.gz")]
    avazu_inputs = [str(root / "avazu")]
    # 12 bad lines of ~3400: 0.35% overall, ~0.7% of rank 0's half: judged on global counts it passes
    return {
        "criteo_vocab_day": {"format": "criteo", "inputs": criteo_inputs, "criteo": {"integers": "bucketize"},
                             "ids": {"rule": "vocab", "min_count": 2}, "max_bad_fraction": 0.005,
                             "split": {"method": "day", "valid_days": [0], "test_days": [1]}},
        "criteo_hash_random": {"format": "criteo", "inputs": criteo_inputs, "max_bad_fraction": 0.005,
                               "ids": {"rule": "hash", "num_embeddings": 5000}, "split": {"method": "random"}},
        "avazu_vocab_permutation": {"format": "avazu", "inputs": avazu_inputs, "ids": {"rule": "vocab", "min_count": 3},
                                    "split": {"method": "permutation"}},
        "avazu_hash_sequential": {"format": "avazu", "inputs": avazu_inputs, "ids": {"rule": "hash", "num_embeddings": 999},
                                  "split": {"method": "sequential", "fractions": [0.6, 0.3, 0.1]}},
        "movielens_vocab_permutation": {"format": "movielens", "inputs": [str(root / "movielens")],
                                        "ids": {"rule": "vocab"}, "split": {"method": "permutation"}},
        "movielens_hash_random": {"format": "movielens", "inputs": [str(root / "movielens")],
                                  "ids": {"rule": "hash", "num_embeddings": 3000}, "split": {"method": "random"}},
        "movielens_genres_vocab_random": {"format": "movielens", "inputs": [str(root / "movielens")],
                                          "movielens": {"genres": True}, "ids": {"rule": "vocab"},
                                          "split": {"method": "random"}},
        "libfm_vocab_permutation": {"format": "libsvm", "inputs": [str(root / "libfm")], "ids": {"rule": "vocab"},
                                    "split": {"method": "permutation"}},
        "table_vocab_permutation": {"format": "table", "inputs": [str(root / "table")], "table": table,
                                    "ids": {"rule": "vocab"}, "split": {"method": "permutation"}},
        "table_hash_sequential": {"format": "table", "inputs": [str(root / "table")], "table": table,
                                  "ids": {"rule": "hash", "num_embeddings": 500}, "split": {"method": "sequential"}},
        "synthetic_sequential": {"format": "synthetic", "split": {"method": "sequential"},
                                 "synthetic": {"rows": 3000, "chunk_rows": 400, "sparse_features": 4, "dense_features": 2}},
        "fails_on_rank_1": {"format": "criteo", "inputs": [str(root / "criteo_truncated" / "day_0"),
                                                            str(root / "criteo_truncated" / "day_1.gz")],
                            "ids": {"rule": "vocab"}, "split": {"method": "random"}, "max_bad_fraction": 0.005},
    }


def config(spec: Dict, output: Path) -> PrepareConfig:
    return from_dict(PrepareConfig, {**spec, **SMALL_BLOCKS, "output": str(output)})


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_mp")
    specs = write_inputs(shared_data, root)
    calls = {name: {"config": config(spec, root / "two" / name)} for name, spec in specs.items()}
    two = call_on_ranks("recsys_kd.data.prepare:prepare", calls, root / "ranks", WORLD_SIZE)
    one = {}
    for name, spec in specs.items():
        try:
            prepare(config(spec, root / "one" / name))
            one[name] = "ok"
        except Exception as error:
            one[name] = f"{type(error).__name__}: {error}"
    return root, specs, one, two


@pytest.mark.multiprocess
def test_two_ranks_write_the_one_process_dataset(runs) -> None:
    root, specs, one_outcomes, two_outcomes = runs
    for name in specs:
        if name.startswith("fails"):
            continue
        assert one_outcomes[name] == "ok" and two_outcomes[name] == ["ok", "ok"], name
        one, two = root / "one" / name, root / "two" / name
        schema_one, schema_two = Schema.load(one), Schema.load(two)
        assert schema_one.sparse == schema_two.sparse and schema_one.dense == schema_two.dense, name
        assert schema_one.dense_transform == schema_two.dense_transform, name  # table's standardize figures
        for split in SPLITS:
            # the parts in order hold the rows in input order: the same table, row for row
            assert read_split(one, split).equals(read_split(two, split)), (name, split)
            assert schema_one.splits[split].rows == schema_two.splits[split].rows
            assert schema_one.splits[split].positives == schema_two.splits[split].positives
        assert (one / "quarantine.jsonl").read_bytes() == (two / "quarantine.jsonl").read_bytes(), name
        for vocabulary in sorted((one / "vocab").glob("*.parquet")) if (one / "vocab").exists() else []:
            assert pq.read_table(vocabulary).equals(pq.read_table(two / "vocab" / vocabulary.name)), vocabulary.name
        record_one = json.loads((one / "prepare.json").read_text())
        record_two = json.loads((two / "prepare.json").read_text())
        for key in ("rows", "positives", "quarantined", "dropped_by_rule", "num_embeddings", "features"):
            assert record_one[key] == record_two[key], (name, key)
        assert record_one["world_size"] == 1 and record_two["world_size"] == WORLD_SIZE
        ranks = record_two["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["rows"] > 0 and r["seconds"] > 0 for r in ranks), name
        assert sum(r["rows"] for r in ranks) == sum(record_two["rows"].values())
        assert sorted(p.name for p in two.iterdir() if p.name.startswith(".")) == [], name
    criteo = json.loads((root / "one" / "criteo_vocab_day" / "prepare.json").read_text())
    assert criteo["quarantined_total"] == len(BAD_CRITEO_LINES) * 4
    assert json.loads((root / "one" / "movielens_hash_random" / "prepare.json").read_text())["dropped_by_rule"]
    table = json.loads((root / "one" / "table_vocab_permutation" / "prepare.json").read_text())
    assert table["quarantined_total"] == len(BAD_TABLE_LINES)
    assert "score: (v - " in Schema.load(root / "one" / "table_hash_sequential").dense_transform


@pytest.mark.multiprocess
def test_a_failing_rank_fails_every_rank_and_nothing_is_published(runs) -> None:
    root, _, one_outcomes, two_outcomes = runs
    name = "fails_on_rank_1"
    assert one_outcomes[name].startswith("InputError: ") and "day_1.gz" in one_outcomes[name]
    rank_0, rank_1 = two_outcomes[name]
    assert rank_1.startswith("InputError: ") and "day_1.gz" in rank_1
    assert rank_0.startswith("PeerFailed: rank 1 failed: InputError: ")
    assert not (root / "two" / name).exists()
    assert [p.name for p in (root / "two").iterdir() if p.name.startswith(".")] == []


def test_dealt_sections_cut_at_line_starts_and_number_lines_as_one_pass(tmp_path: Path) -> None:
    lines = [f"{i}\t{'x' * (i * 7 % 50)}\n" for i in range(300)] + ["last line without newline"]
    first = tmp_path / "a.tsv"
    first.write_text("".join(lines))
    second = tmp_path / "b.tsv.gz"
    with gzip.open(second, "wt") as handle:
        handle.write("".join(lines[:50]))
    files = [first, second]
    whole = [list(read_delimited(f, ["n", "text"], "\t", None, block_bytes=4096)) for f in files]
    numbers = [[int(n) for block in blocks for n in block.lines] for blocks in whole]
    for world_size in (1, 2, 3, 7):
        spans = deal_files(files, world_size)
        assert len(spans) == world_size
        counts = [[count_lines(files[s.file], s) for s in span] for span in spans]
        placed = [s for span in place(spans, counts) for s in span]
        assert [s.file for s in placed] == sorted(s.file for s in placed)
        assert all(s.file == 0 or (s.start, s.end) == (0, second.stat().st_size) for s in placed)  # gz: whole
        for index, path in enumerate(files):
            pieces = [s for s in placed if s.file == index]
            assert pieces[0].start == 0 and pieces[-1].end == path.stat().st_size
            assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
            read = [int(n) for s in pieces
                    for block in read_delimited(path, ["n", "text"], "\t", None, block_bytes=4096, section=s)
                    for n in block.lines]
            assert read == numbers[index], (world_size, index)
        assert sum(map(sum, counts)) == len(lines) + 50


def test_table_sections_read_the_whole_input_row_for_row(tmp_path: Path) -> None:
    """Dealt to 1..9 ranks (Parquet cut at row group starts, the CSV at line starts after its header),
    the sections' rows and quarantine, read in rank order, are the whole input's."""
    write_table_inputs(tmp_path / "table")
    source = TableSource(sorted((tmp_path / "table").iterdir()), table_spec(), SplitConfig(), block_bytes=4096)
    quarantine = Quarantine(tmp_path / "whole.jsonl")
    whole = pa.concat_tables([chunk.table for chunk in source.chunks(quarantine)])
    quarantine.close()
    parquet_cuts = set()
    for world_size in (1, 2, 3, 9):
        spans = source.deal(world_size)
        placed = place(spans, [[source.count_lines(section) for section in span] for span in spans])
        quarantine = Quarantine(tmp_path / f"{world_size}.jsonl")
        dealt = pa.concat_tables([chunk.table for span in placed for chunk in source.chunks(quarantine, span)])
        quarantine.close()
        assert dealt.equals(whole), world_size
        assert (tmp_path / f"{world_size}.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
        parquet_cuts.update(s.first_line for span in placed for s in span if s.file == 2 and s.start > 0)
    assert parquet_cuts and all(line % 97 == 0 for line in parquet_cuts)  # inside the Parquet file: row groups
