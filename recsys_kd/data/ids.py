"""Raw values -> embedding ids: stable hashing and streaming vocabularies.

Both rules reserve id 0 for a missing value and id 1 for out-of-vocabulary (see ``schema``).
Everything here is vectorized over Arrow/numpy arrays; nothing loops over rows in Python.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_kd.data.schema import MISSING_ID, OOV_ID, RESERVED_IDS

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def stable_hash(values: pa.Array, seed: int) -> np.ndarray:
    """64-bit hash of each value, identical across processes, machines and runs.

    Integers hash their two's-complement value; strings/binary hash their bytes 8 at a time
    (plus length), so values of any length are distinguished. Nulls hash like 0 / "" and must be
    masked by the caller.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    seed_word = splitmix64(np.array([seed], dtype=np.uint64) + _GOLDEN)[0]
    if pa.types.is_integer(values.type):
        raw = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        with np.errstate(over="ignore"):
            return splitmix64(raw ^ seed_word)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary())
    if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
        raise TypeError(f"cannot hash values of type {values.type}")
    return _hash_bytes(values, seed_word)


def _hash_bytes(values: pa.Array, seed_word: np.uint64) -> np.ndarray:
    offset_type = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    _, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[values.offset : values.offset + len(values) + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    if values.null_count:
        lengths = np.where(values.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    max_length = int(lengths.max()) if len(lengths) else 0
    width = max(8, -(-max_length // 8) * 8)
    # Gather the bytes into a zero-padded [N, width] matrix, one byte column at a time (vectorized
    # over rows), then hash it 8 bytes (one little-endian word) at a time.
    padded = np.concatenate([data, np.zeros(width, np.uint8)])
    matrix = np.zeros((len(values), width), dtype=np.uint8)
    for position in range(max_length):
        column = padded[starts + position]
        column[lengths <= position] = 0
        matrix[:, position] = column
    words = matrix.view("<u8")
    with np.errstate(over="ignore"):
        state = np.full(len(values), seed_word, dtype=np.uint64) ^ lengths.astype(np.uint64)
        for column in range(width // 8):
            state = splitmix64((state + _GOLDEN) ^ words[:, column])
    return splitmix64(state)


def hash_ids(values: pa.Array, num_embeddings: int, seed: int) -> np.ndarray:
    """Hashes values into ids in [RESERVED_IDS, num_embeddings); missing values get MISSING_ID."""
    if num_embeddings <= RESERVED_IDS:
        raise ValueError(f"num_embeddings must exceed {RESERVED_IDS} reserved ids, got {num_embeddings}")
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    buckets = np.uint64(num_embeddings - RESERVED_IDS)
    ids = (stable_hash(values, seed) % buckets).astype(np.int64) + RESERVED_IDS
    if values.null_count:
        ids[values.is_null().to_numpy(zero_copy_only=False)] = MISSING_ID
    return ids


class VocabularyCounter:
    """Counts value occurrences per feature over a stream of Arrow tables, in bounded memory
    (proportional to the number of distinct values, not rows).

    Example::

        counter = VocabularyCounter(["C1", "C2"])
        for table in chunks:
            counter.update(table)
        vocab = counter.vocabulary("C1", min_count=8)   # pa.Table(value, count), id = row + 2
    """

    def __init__(self, features: List[str], compact_every_rows: int = 4_000_000) -> None:
        self._features = list(features)
        self._pending: Dict[str, List[pa.Table]] = {name: [] for name in features}
        self._pending_rows = 0
        self._compact_every_rows = compact_every_rows

    @property
    def features(self) -> List[str]:
        return list(self._features)

    def update(self, table: pa.Table) -> None:
        for name in self._features:
            column = table.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                column = pc.list_flatten(column)  # a multi-hot feature counts each value of each list
            counts = pc.value_counts(column.drop_null())
            self._pending[name].append(
                pa.table({"value": counts.field("values"), "count": counts.field("counts").cast(pa.int64())})
            )
        self._pending_rows += table.num_rows
        if self._pending_rows >= self._compact_every_rows:
            self._compact()

    def _compact(self) -> None:
        for name, tables in self._pending.items():
            if len(tables) > 1:
                self._pending[name] = [sum_counts(tables)]
        self._pending_rows = 0

    def counts(self, name: str) -> pa.Table:
        """Every value of feature ``name`` seen so far with its count, (value, count), in no order."""
        self._compact()
        tables = self._pending[name]
        return tables[0] if tables else empty_counts()

    def vocabulary(self, name: str, min_count: int) -> pa.Table:
        """Values seen at least ``min_count`` times, most frequent first (ties by value), as a
        table (value, count); the value in row r gets id r + RESERVED_IDS."""
        return vocabulary_order(self.counts(name), min_count)


def empty_counts() -> pa.Table:
    return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})


def sum_counts(tables: List[pa.Table]) -> pa.Table:
    """(value, count) tables -> one with each value once and its counts summed."""
    filled = [table for table in tables if table.num_rows]
    if not filled:  # keeps the values' type when there is one
        return tables[0] if tables else empty_counts()
    merged = pa.concat_tables(filled).group_by("value").aggregate([("count", "sum")])
    return merged.rename_columns(["value", "count"])


def vocabulary_order(counts: pa.Table, min_count: int) -> pa.Table:
    """The vocabulary of unique (value, count) rows: those with count >= ``min_count``, most frequent
    first, ties by value; row r gets id r + RESERVED_IDS. The order depends only on the counts, so
    counts summed over ranks give one process's vocabulary."""
    counts = counts.filter(pc.greater_equal(counts.column("count"), min_count))
    return counts.sort_by([("count", "descending"), ("value", "ascending")])


def vocab_ids(values: pa.Array, vocabulary: pa.Array) -> np.ndarray:
    """Ids of ``values`` in ``vocabulary`` (row r -> r + RESERVED_IDS); values not in it get OOV_ID,
    missing values MISSING_ID."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    positions = pc.index_in(values, value_set=vocabulary)
    ids = positions.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + RESERVED_IDS
    ids[ids < RESERVED_IDS] = OOV_ID
    if values.null_count:
        ids[values.is_null().to_numpy(zero_copy_only=False)] = MISSING_ID
    return ids
