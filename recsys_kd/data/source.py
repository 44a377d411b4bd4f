"""What a converter provides to ``prepare``: validated rows as Arrow tables, in a fixed order.

A source is read once or twice (a second pass when vocabularies or a count-based split need one);
both passes must yield identical rows, and only the pass given a quarantine reports bad rows.

Columns of each yielded table:
    row_id   int64    unique, increasing source row index (physical line across the input files)
    label    float32  0 or 1
    <dense>  float32  transformed dense features
    <sparse> any Arrow type (strings, integers, or lists of them for multi-hot), null = missing
    day      int32    optional: the time bucket used by ``split.method: day``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Dict, Iterator, List, Optional, Protocol

import pyarrow as pa

from recsys_kd.data.quarantine import Quarantine

LABEL = "label"
DAY = "day"


class InputError(ValueError):
    """Raw input that cannot be converted at all (empty, truncated, unreadable, no labelled column),
    as opposed to bad rows, which are quarantined. The message names the file."""


@dataclass
class SourceChunk:
    table: pa.Table
    progress: int  # units of RawSource.progress_total() covered by this chunk (bytes or rows)


@dataclass
class SourceInfo:
    """Static facts about a source: feature columns, which sparse features are multi-hot,
    sparse features whose ids the source already made (identity rule, with their sizes), how the
    dense values were transformed (``schema.json``'s ``dense_transform``), and rows dropped on
    purpose by the format's labelling rule (counted, reported; not quarantined)."""

    name: str
    dense: List[str]
    sparse: List[str]
    multi_hot: Collection[str] = ()
    identity_sizes: Dict[str, int] = field(default_factory=dict)
    extra: List[str] = field(default_factory=list)
    inputs: List[str] = field(default_factory=list)
    dense_transform: str = "none"


class RawSource(Protocol):
    info: SourceInfo
    dropped_by_rule: Dict[str, int]

    def progress_total(self) -> int:
        """Total progress units (input bytes, or rows for generated data)."""

    def chunks(self, quarantine: Optional[Quarantine]) -> Iterator[SourceChunk]:
        """Validated rows in a fixed order; bad rows go to ``quarantine`` when given."""
