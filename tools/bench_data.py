"""Data-layer benchmark: prepare and read throughput (rows/s) and peak RSS, 1M and 5M rows.

Synthetic Criteo-shaped data (26 sparse + 13 dense fields). For each size, each phase runs in its
own process so its peak RSS is its own:
  synthesize     generate raw Criteo-format TSV (not a target, shown for context)
  prepare-tsv    the Criteo converter on that TSV (hash ids, random split)
  prepare-synth  the synthetic source straight to Parquet
  read-seq       the streaming reader over the train split, batch 4096, no shuffle
  read-shuffle   the same with shuffle (window of 8 row groups): first epoch, buffers cold
  read-warm      the same, second epoch of the same reader (steady state of a training run)
  open-verify    making the reader, which checks each part of the split against its schema.json
                 checksum (fastest of 5, the process's cache cleared each time), then one sequential
                 epoch (the rows/s figure)
  open-noverify  the same with ReaderConfig(verify=False); the difference in making the reader is the
                 cost of verifying, paid once per process

Targets (issue 2): read >= 1,000,000 rows/s per process; prepare >= 200,000 rows/s per process;
peak RSS at 5M rows within 10% of that at 1M rows.

    .venv/bin/python tools/bench_data.py [--sizes 1000000 5000000] [--workdir runs/bench_data]
        [--phases prepare-synth open-noverify open-verify]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def phase(name: str, rows: int, workdir: Path) -> dict:
    """Runs one phase in this process and returns its figures (called in a child process)."""
    from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
    from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv

    synthetic = SyntheticConfig(rows=rows, seed=0, max_vocab=100_000)
    raw = workdir / "raw.txt"
    started = time.perf_counter()
    if name == "synthesize":
        write_criteo_tsv(synthetic, raw, progress=False)
    elif name == "prepare-tsv":
        prepare(PrepareConfig(format="criteo", inputs=[str(raw)], output=str(workdir / "tsv"), overwrite=True,
                              progress=False, ids=IdConfig(rule="hash", num_embeddings=100_000)))
    elif name == "prepare-synth":
        prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(workdir / "synth"),
                              overwrite=True, progress=False))
    elif name.startswith("read"):
        from recsys_kd.data.reader import ParquetReader, ReaderConfig

        config = ReaderConfig(batch_size=4096, shuffle=name != "read-seq")
        reader = ParquetReader(workdir / "synth", "train", config, rank=0, world_size=1)
        epochs = 2 if name == "read-warm" else 1
        for epoch in range(epochs):
            reader.set_epoch(epoch)
            started = time.perf_counter()
            rows = sum(batch.batch_size for batch in reader)
    elif name.startswith("open"):
        from recsys_kd.data import integrity
        from recsys_kd.data.reader import ParquetReader, ReaderConfig

        config = ReaderConfig(batch_size=4096, verify=name == "open-verify")
        opens = []
        for _ in range(5):  # making a reader: footers (+ each part's checksum); the fastest of 5
            integrity.forget()
            started = time.perf_counter()
            reader = ParquetReader(workdir / "synth", "train", config, rank=0, world_size=1)
            opens.append(time.perf_counter() - started)
        opened = min(opens)
        split_bytes = sum(path.stat().st_size for path in reader.files)
        started = time.perf_counter()
        rows = sum(batch.batch_size for batch in reader)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"phase": name, "size": synthetic.rows, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
              "peak_rss_mib": peak_mib}
    if name.startswith("open"):  # seconds: the epoch alone
        result.update(open_seconds=opened, split_mib=split_bytes / 2**20)
    return result


PHASES = ["synthesize", "prepare-tsv", "prepare-synth", "read-seq", "read-shuffle", "read-warm", "open-noverify",
          "open-verify"]


def run_child(name: str, rows: int, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--rows", str(rows), "--workdir", str(workdir)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_data"))
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES,
                        help="phases to run, in this order (a read phase needs prepare-synth's data)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(phase(args.child, args.rows, args.workdir)))
        return

    print(f"# bench_data  {time.strftime('%Y-%m-%d')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"python {platform.python_version()}")
    results = []
    for rows in args.sizes:
        workdir = args.workdir / f"rows_{rows}"
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.phases:
            result = run_child(name, rows, workdir)
            results.append(result)
            opened = f"  (open {result['open_seconds']:.2f} s)" if "open_seconds" in result else ""
            print(f"{name:14s} {result['rows']:>10,d} rows  {result['seconds']:7.1f} s  {result['rows_per_s']:>12,.0f} rows/s  "
                  f"peak RSS {result['peak_rss_mib']:7.0f} MiB{opened}", flush=True)
        if not args.keep:
            shutil.rmtree(workdir)
    for rows in args.sizes:
        timed = {r["phase"]: r for r in results if r["size"] == rows and r["phase"].startswith("open")}
        if len(timed) == 2:
            verify, plain = timed["open-verify"], timed["open-noverify"]
            cost = verify["open_seconds"] - plain["open_seconds"]
            epoch = min(verify["seconds"], plain["seconds"])
            print(f"\nverify cost at {rows:,} rows: making the reader {plain['open_seconds']:.3f} s -> "
                  f"{verify['open_seconds']:.3f} s ({verify['split_mib']:.0f} MiB checked at "
                  f"{verify['split_mib'] / max(cost, 1e-9):,.0f} MiB/s), {cost / epoch * 100:.0f}% of one sequential "
                  f"epoch ({epoch:.2f} s), once per process")
    if len(args.sizes) > 1 and {"prepare-tsv", "prepare-synth", "read-seq", "read-shuffle"} <= set(args.phases):
        small, large = min(args.sizes), max(args.sizes)
        print("\npeak RSS growth from the smallest to the largest size (target: within 10%):")
        for name in ("prepare-tsv", "prepare-synth", "read-seq", "read-shuffle"):
            a = next(r for r in results if r["phase"] == name and r["size"] == small)["peak_rss_mib"]
            b = next(r for r in results if r["phase"] == name and r["size"] == large)["peak_rss_mib"]
            print(f"  {name:14s} {a:7.0f} MiB -> {b:7.0f} MiB  ({(b / a - 1) * 100:+.1f}%)")
    targets = [("read-seq", 1_000_000), ("read-shuffle", 1_000_000), ("read-warm", 1_000_000),
               ("prepare-tsv", 200_000), ("prepare-synth", 200_000)]
    print("\nthroughput vs target (rows/s per process):")
    for name, target in [(name, target) for name, target in targets if name in args.phases]:
        worst = min(r["rows_per_s"] for r in results if r["phase"] == name)
        print(f"  {name:14s} worst {worst:>12,.0f}  target {target:>10,d}  {'ok' if worst >= target else 'BELOW'}")


if __name__ == "__main__":
    main()
