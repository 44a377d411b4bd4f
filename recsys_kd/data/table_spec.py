"""The feature spec of users' own logs (``prepare.table``, read by :mod:`recsys_kd.data.table`).

The spec (:class:`TableOptions`): CSV/TSV fields may be quoted with ``quote_char`` (RFC 4180, default
``"``; ``none`` or empty: no quoting, a quote is then an ordinary character), and each column becomes:
    label      ``label.column`` by its rule: ``threshold`` t (a number, label = value >= t), ``values``
               (text -> 0/1, the values in ``drop`` dropped by rule and counted as ``label_<value>``),
               or by default a number that must be 0 or 1
    dense      float32 features by ``transform``: ``none`` v; ``log`` log(1 + max(v, 0)); ``clip``
               min(max(v, min), max); ``standardize`` (v - mean) / std with the mean and (population)
               std of the *training split's* rows (an extra pass over the input before the others;
               std 0 counts as 1); a missing value is 0 after the transform. ``bucketize`` makes the
               column a categorical (sparse) feature instead: the bucket index
               ``#{boundaries <= v}`` (numpy ``searchsorted(boundaries, v, "right")``), missing stays
               missing
    sparse     categorical features (text), ids by ``prepare.ids`` (hash or vocabulary)
    multi_hot  list features: the text split at ``separator`` (empty tokens dropped), or a list
               column's values; the first ``max_length`` kept
    time       optional: the ``day`` (days since 1970-01-01, UTC) of each row for ``split.method: day``,
               from ``unit`` ``seconds`` or ``milliseconds`` since the epoch, or ``date`` text
               starting ``YYYY-MM-DD`` (ISO dates and date-times, Parquet dates and timestamps)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

from recsys_kd.data.schema import ROW_ID
from recsys_kd.data.source import DAY, LABEL

RESERVED_NAMES = (ROW_ID, LABEL, DAY)


@dataclass
class LabelRule:
    """The label column and its rule (one of ``threshold``, ``values``, or neither: 0/1 numbers)."""

    column: str = "label"
    threshold: Optional[float] = None
    values: Dict[str, float] = field(default_factory=dict)
    drop: List[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.threshold is not None and self.values:
            raise ValueError("label: give threshold or values, not both")
        bad = {value: label for value, label in self.values.items() if label not in (0.0, 1.0)}
        if bad:
            raise ValueError(f"label.values must map to 0 or 1, got {bad}")
        if self.drop and not self.values:
            raise ValueError("label.drop needs label.values (the values kept)")


@dataclass
class DenseColumn:
    """A numeric column and its transform; ``min``/``max`` for clip, ``boundaries`` for bucketize."""

    column: str
    transform: Literal["none", "log", "standardize", "clip", "bucketize"] = "none"
    min: Optional[float] = None
    max: Optional[float] = None
    boundaries: List[float] = field(default_factory=list)

    def validate(self) -> None:
        if self.transform == "clip" and self.min is None and self.max is None:
            raise ValueError(f"dense column {self.column!r}: clip needs min and/or max")
        if self.transform == "clip" and None not in (self.min, self.max) and self.min > self.max:
            raise ValueError(f"dense column {self.column!r}: clip min {self.min} > max {self.max}")
        if self.transform == "bucketize":
            if not self.boundaries or any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
                raise ValueError(f"dense column {self.column!r}: bucketize needs increasing boundaries, got {self.boundaries}")
        elif self.boundaries:
            raise ValueError(f"dense column {self.column!r}: boundaries are for transform bucketize")


@dataclass
class MultiHotColumn:
    """A list-valued column: text split at ``separator`` (or a list column), first ``max_length`` kept
    (0: all)."""

    column: str
    separator: str = "|"
    max_length: int = 0

    def validate(self) -> None:
        if not self.separator:
            raise ValueError(f"multi_hot column {self.column!r}: separator must not be empty")
        if self.max_length < 0:
            raise ValueError(f"multi_hot column {self.column!r}: max_length must be >= 0 (0: no limit)")


@dataclass
class TimeColumn:
    """The column giving each row's day (for ``split.method: day``)."""

    column: str
    unit: Literal["seconds", "milliseconds", "date"] = "seconds"


@dataclass
class TableOptions:
    """``prepare.table``: how to read the files and what each column becomes (module docstring)."""

    file_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    header: bool = True
    quote_char: str = '"'
    columns: List[str] = field(default_factory=list)
    label: LabelRule = field(default_factory=LabelRule)
    dense: List[DenseColumn] = field(default_factory=list)
    sparse: List[str] = field(default_factory=list)
    multi_hot: List[MultiHotColumn] = field(default_factory=list)
    time: Optional[TimeColumn] = None

    def validate(self) -> None:
        quote = self.quote
        if quote is not None and (len(quote.encode()) != 1 or quote in ",\t\r\n"):
            raise ValueError(f"table.quote_char must be one ASCII character other than the separators and line "
                             f"breaks, or none (no quoting), got {self.quote_char!r}")
        if not self.header and not self.columns and self.file_format in ("csv", "tsv"):
            raise ValueError("table: header: false needs columns (the names of the columns, in order)")
        names = [*(d.column for d in self.dense), *self.sparse, *(m.column for m in self.multi_hot)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"table: column {repeated[0]!r} is given as more than one feature")
        reserved = [name for name in names if name in RESERVED_NAMES]
        if reserved:
            raise ValueError(f"table: feature name {reserved[0]!r} is reserved ({', '.join(RESERVED_NAMES)}); rename the column")
        if self.label.column in names:
            raise ValueError(f"table: the label column {self.label.column!r} is also a feature")

    @property
    def quote(self) -> Optional[str]:
        """The character CSV/TSV fields may be quoted with; None: no quoting (``quote_char`` none or empty)."""
        return None if self.quote_char in ("", "none") else self.quote_char

    @property
    def needed(self) -> List[str]:
        """The columns read, each once."""
        names = [self.label.column, *(d.column for d in self.dense), *self.sparse, *(m.column for m in self.multi_hot)]
        if self.time is not None:
            names.append(self.time.column)
        return list(dict.fromkeys(names))
