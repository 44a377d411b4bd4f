"""Deterministic train/valid/test assignment (pure functions of row identity, seed and counts).

Methods:
    random       hash(seed, row_id) -> [0, 1) against the fractions; streaming, any size
    permutation  numpy.random.RandomState(seed).permutation(n): the first fractions[0] * n kept rows
                 (in source order) train, the next valid, the rest test -- the split FuxiCTR/RecBole
                 users make, reproduced exactly; needs n int64 in memory
    sequential   by position: first fractions[0] * n rows train, next valid, rest test (time order)
    day          by the source's day column: ``valid_days`` / ``test_days``, the rest train
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import pyarrow as pa

from recsys_kd.data.ids import splitmix64
from recsys_kd.data.schema import ROW_ID
from recsys_kd.data.source import DAY, InputError

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = 0, 1, 2
PERMUTATION_MAX_ROWS = 500_000_000


@dataclass
class SplitConfig:
    method: Literal["random", "permutation", "sequential", "day"] = "random"
    seed: int = 2022
    fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    valid_days: List[int] = field(default_factory=list)
    test_days: List[int] = field(default_factory=list)

    def validate(self) -> None:
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise ValueError(f"split.fractions must be 3 non-negative numbers, got {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-9:
            raise ValueError(f"split.fractions must sum to 1, got {self.fractions} (sum {sum(self.fractions)})")
        if self.method == "day" and not self.test_days:
            raise ValueError("split.method 'day' needs split.test_days")

    @property
    def needs_count(self) -> bool:
        return self.method in ("permutation", "sequential")


def split_counts(n: int, fractions: List[float]) -> List[int]:
    """Rows per split for count-based methods: floor for train and valid, the rest test."""
    train = int(fractions[0] * n)
    valid = int(fractions[1] * n)
    return [train, valid, n - train - valid]


def assign_random(row_ids: np.ndarray, seed: int, fractions: List[float]) -> np.ndarray:
    """Split index per row from a stable hash of (seed, row_id); independent of chunking."""
    mixed = splitmix64(row_ids.astype(np.int64).view(np.uint64) ^ splitmix64(np.array([seed], np.uint64))[0])
    uniform = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return _by_thresholds(uniform, np.cumsum(fractions)[:2])


def assign_by_rank(ranks: np.ndarray, n: int, fractions: List[float]) -> np.ndarray:
    """Split index per row from its rank in [0, n) (its position, or its place in a permutation)."""
    train, valid, _ = split_counts(n, fractions)
    return _by_thresholds(ranks, np.array([train, train + valid]))


def permutation_ranks(n: int, seed: int) -> np.ndarray:
    """rank[j] = place of the j-th kept row in RandomState(seed).permutation(n)."""
    if n > PERMUTATION_MAX_ROWS:
        raise ValueError(
            f"split.method 'permutation' holds {n} int64 in memory; above {PERMUTATION_MAX_ROWS} rows use 'random'"
        )
    permutation = np.random.RandomState(seed).permutation(n)
    ranks = np.empty(n, dtype=np.int64)
    ranks[permutation] = np.arange(n, dtype=np.int64)
    return ranks


def assign(
    split: SplitConfig, table: pa.Table, position: int, kept_rows: Optional[int], ranks: Optional[np.ndarray]
) -> np.ndarray:
    """Split index of each row of a converter's ``table`` whose first row is the ``position``-th kept
    row; ``kept_rows`` (count-based methods) is the number of kept rows in the whole input, ``ranks``
    the :func:`permutation_ranks` of the permutation method."""
    if split.method == "random":
        return assign_random(table.column(ROW_ID).to_numpy(), split.seed, split.fractions)
    if split.method == "day":
        if DAY not in table.column_names:
            raise InputError("split.method 'day' needs a source with days (Criteo day_N files, Avazu hours, a table's time column)")
        return assign_day(table.column(DAY).to_numpy(), split.valid_days, split.test_days)
    positions = np.arange(position, position + table.num_rows, dtype=np.int64)
    order = ranks[positions] if ranks is not None else positions
    return assign_by_rank(order, kept_rows, split.fractions)


def assign_day(days: np.ndarray, valid_days: List[int], test_days: List[int]) -> np.ndarray:
    split = np.full(len(days), TRAIN, dtype=np.int8)
    split[np.isin(days, valid_days)] = VALID
    split[np.isin(days, test_days)] = TEST
    return split


def _by_thresholds(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.searchsorted(thresholds, values, side="right").astype(np.int8)
