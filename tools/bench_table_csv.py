"""CSV reading speed of ``format: table`` with and without RFC 4180 quoting (rows per CPU second, best of N).

Writes a CSV of ``--rows`` records (8 columns: label, ids, numbers, a multi-hot field, a timestamp, a
city) three ways with Python's csv module: ``plain`` (no quote anywhere), ``minimal`` (QUOTE_MINIMAL;
the cities holding a comma are quoted, one row in ``--quoted-every``), ``all`` (QUOTE_ALL: every field
and the header quoted). Then times, on each file:

  raw-noquote  the raw-text reader with quoting off (``quote_char: none``: the reader as it was before
               quoting existed, byte for byte the same code path)
  raw-quote    the raw-text reader with quoting on (the default), which scans each block for quotes and
               checks the quoted lines
  table        the whole ``format: table`` conversion (TableSource.chunks: labels, numbers, ids text,
               multi-hot lists) with the default quoting

Rates are rows per second of this process's CPU time (all its threads: Arrow parses with several), so
that a machine shared with other work still gives comparable figures; on an idle machine with one
core per thread the wall-clock rate is about the same or higher.

    .venv/bin/python tools/bench_table_csv.py [--rows 1000000] [--repeats 3] [--workdir runs/bench_csv]
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict

from recsys_kd.data.rawtext import read_delimited
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.table import TableSource
from recsys_kd.data.table_spec import DenseColumn, LabelRule, MultiHotColumn, TableOptions

COLUMNS = ["clicked", "user", "item", "price", "age", "tags", "ts", "city"]
CITIES = ["Paris", "Berlin", "São Paulo", "Köln", "Lyon", "Porto", "Oslo"]
SPEC = TableOptions(
    label=LabelRule(column="clicked"), sparse=["user", "item", "city"],
    dense=[DenseColumn("price", transform="log"), DenseColumn("age", transform="bucketize", boundaries=[18, 30, 50])],
    multi_hot=[MultiHotColumn("tags", separator="|", max_length=4)],
)


def write(path: Path, rows: int, quoting: int, quoted_every: int) -> None:
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=quoting, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i in range(rows):
            city = "Paris, FR" if quoting != csv.QUOTE_NONE and i % quoted_every == 0 else rng.choice(CITIES)
            writer.writerow([rng.randint(0, 1), f"u{rng.randint(1, 100_000)}", f"i{rng.randint(1, 20_000)}",
                             f"{rng.uniform(0, 500):.2f}", rng.randint(15, 80),
                             "|".join(rng.sample("abcdefgh", rng.randint(0, 4))), 1_700_000_000 + i, city])


def best_rate(rows: int, repeats: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return rows / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quoted-every", type=int, default=10)
    parser.add_argument("--workdir", default="runs/bench_csv")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"plain": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL}
    print(f"{args.rows:,} rows, best of {args.repeats}, {platform.machine()}, Python {platform.python_version()}")
    print(f"{'file':<8} {'MiB':>6} {'raw-noquote':>12} {'raw-quote':>12} {'table':>12}   (rows per CPU second)")
    for name, quoting in files.items():
        path = workdir / f"{name}.csv"
        write(path, args.rows, quoting, args.quoted_every)
        rates: Dict[str, float] = {}
        for label, quote in (("raw-noquote", None), ("raw-quote", '"')):
            rates[label] = best_rate(args.rows, args.repeats, lambda quote=quote: [
                None for _ in read_delimited(path, COLUMNS, ",", None, skip_header=True, quote_char=quote)])
        source = TableSource([path], SPEC, SplitConfig())
        source.fit()
        rates["table"] = best_rate(args.rows, args.repeats, lambda: [None for _ in source.chunks(None)])
        size = path.stat().st_size / 2**20
        print(f"{name:<8} {size:6.1f} " + " ".join(f"{rates[k]:12,.0f}" for k in ("raw-noquote", "raw-quote", "table")))
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
