"""A dataset's vocabularies from the value counts of every rank: ``vocab/<feature>.parquet``.

One process orders its own counts (:func:`~recsys_kd.data.ids.vocabulary_order`: count >= min_count,
most frequent first, ties by value; row r gets id r + 2). On N ranks the counts meet in
hash-partitioned files under the staging directory, so no rank holds every rank's counts: each rank
writes its counts of the values of partition p (``stable_hash(value) mod N``) to
``.vocab-counts/<feature>/to-P-from-R.parquet``, rank p sums partition p and cuts it at min_count,
and rank 0 orders the partitions' sums, which is the order one process gives the same counts.
Each step ends with every rank's verdict (:func:`~recsys_kd.distributed.gather_outcome`).

Example::

    write_vocabularies(counter, {"C1": 2, "C2": 2}, staging, rank, world_size)   # collective
    pq.read_table(staging / "vocab" / "C1.parquet")                              # value, count, id
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.id_rules import vocab_file
from recsys_kd.data.ids import VocabularyCounter, stable_hash, sum_counts, vocabulary_order
from recsys_kd.data.schema import RESERVED_IDS
from recsys_kd.distributed import from_rank, gather_outcome

VOCAB_SCRATCH = ".vocab-counts"  # N ranks: the hash-partitioned value counts, removed before publishing


def write_vocabularies(counter: VocabularyCounter, min_counts: Dict[str, int], staging: Path, rank: int,
                       world_size: int) -> None:
    """Writes ``staging/vocab/<feature>.parquet`` for each of ``counter``'s features from every rank's
    counts (collective: every rank calls it with its own counter)."""
    if world_size == 1:
        from_rank(0, lambda: _write(staging, {name: counter.counts(name) for name in counter.features}, min_counts))
        return
    scratch = staging / VOCAB_SCRATCH
    gather_outcome(lambda: _write_partitions(counter, scratch, rank, world_size))
    gather_outcome(lambda: _sum_partition(scratch, rank, min_counts))
    from_rank(0, lambda: _write(staging, {
        name: sum_counts([pq.read_table(path) for path in sorted((scratch / name).glob("sum-*.parquet"))])
        for name in counter.features
    }, min_counts))


def _write_partitions(counter: VocabularyCounter, scratch: Path, rank: int, world_size: int) -> None:
    for name in counter.features:
        counts = counter.counts(name)
        partition = stable_hash(counts.column("value"), seed=0) % np.uint64(world_size)
        (scratch / name).mkdir(parents=True, exist_ok=True)
        for target in range(world_size):
            piece = counts.filter(pa.array(partition == target))
            pq.write_table(piece, scratch / name / f"to-{target:05d}-from-{rank:05d}.parquet")


def _sum_partition(scratch: Path, rank: int, min_counts: Dict[str, int]) -> None:
    """This rank's partition of every feature's counts, summed over the ranks and cut at min_count."""
    for name, min_count in min_counts.items():
        pieces = [pq.read_table(path) for path in sorted((scratch / name).glob(f"to-{rank:05d}-from-*.parquet"))]
        pq.write_table(vocabulary_order(sum_counts(pieces), min_count), scratch / name / f"sum-{rank:05d}.parquet")


def _write(staging: Path, counts: Dict[str, pa.Table], min_counts: Dict[str, int]) -> None:
    for name, table in counts.items():
        table = vocabulary_order(table, min_counts[name])
        table = table.append_column("id", pa.array(np.arange(table.num_rows, dtype=np.int64) + RESERVED_IDS))
        path = staging / vocab_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
