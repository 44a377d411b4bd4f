"""Exact, order-independent sums and moments of float64 values (standardize statistics of
``format: table``): the same figures however the input is chunked or dealt to ranks (each rank's
moments travel as JSON, :meth:`Moments.to_json`, and add up exactly)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Tuple

import numpy as np


class ExactSum:
    """The exact sum of float64 values, held as an integer count of 2**-1127 (below the smallest
    subnormal's last bit), so it does not depend on how the values are ordered or chunked; two sums
    (of two ranks, say) merge by ``+``."""

    UNIT_EXPONENT = 1127

    def __init__(self, units: int = 0) -> None:
        self.units = units

    def add(self, values: np.ndarray) -> None:
        mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float64))
        integers = (mantissa * 2.0**53).astype(np.int64)  # exact: a float64 has 53 significant bits
        shifts = exponent.astype(np.int64) - 53 + self.UNIT_EXPONENT  # value = integer * 2**(shift - 1127)
        high, low = integers >> 26, integers & ((1 << 26) - 1)  # halves whose sums cannot overflow int64
        for shift in np.unique(shifts):
            at = shifts == shift
            self.units += (int(high[at].sum()) << (int(shift) + 26)) + (int(low[at].sum()) << int(shift))

    def __add__(self, other: "ExactSum") -> "ExactSum":
        return ExactSum(self.units + other.units)

    def fraction(self) -> Fraction:
        return Fraction(self.units, 1 << self.UNIT_EXPONENT)


@dataclass
class Moments:
    """Count, sum and sum of squares of a column's values (exactly summed: see :class:`ExactSum`)."""

    count: int = 0
    total: ExactSum = field(default_factory=ExactSum)
    squares: ExactSum = field(default_factory=ExactSum)

    def add(self, values: np.ndarray) -> None:
        self.count += len(values)
        self.total.add(values)
        self.squares.add(np.square(values))

    def to_json(self) -> List:
        """[count, sum, sum of squares], the sums as hexadecimal integer units (exact, and free of the
        decimal digit limit Python puts on reading long integers)."""
        return [self.count, format(self.total.units, "x"), format(self.squares.units, "x")]

    @classmethod
    def from_json(cls, value: List) -> "Moments":
        return cls(value[0], ExactSum(int(value[1], 16)), ExactSum(int(value[2], 16)))

    def __add__(self, other: "Moments") -> "Moments":
        """The moments of both sets of values (two ranks' shares, say)."""
        return Moments(self.count + other.count, self.total + other.total, self.squares + other.squares)

    def mean_std(self) -> Tuple[float, float]:
        """(mean, population std); (0, 1) without values, std 1 when the values are constant."""
        if self.count == 0:
            return 0.0, 1.0
        mean = self.total.fraction() / self.count
        variance = max(self.squares.fraction() / self.count - mean * mean, Fraction(0))
        std = math.sqrt(variance)
        return float(mean), (std if std > 0 else 1.0)
