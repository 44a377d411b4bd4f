"""What a converter provides to ``prepare``: validated rows as Arrow tables, in a fixed order.

A source is read once or twice (a second pass when vocabularies or a count-based split need one);
both passes must yield identical rows, and only the pass given a quarantine reports bad rows. On N
ranks each rank reads the :class:`Section` s dealt to it (:meth:`RawSource.deal`), numbered as one
process numbers them, so every row keeps its row_id and every refused line its line number. A source
whose conversion needs figures of the whole input (``format: table``'s standardize statistics) also
has ``fit(sections, rank)``, which ``prepare`` calls on every rank (collective) before the passes.

Columns of each yielded table:
    row_id   int64    unique, increasing source row index (physical line across the input files)
    label    float32  0 or 1
    <dense>  float32  transformed dense features
    <sparse> any Arrow type (strings, integers, or lists of them for multi-hot), null = missing
    <sparse>__weight  float32 (list<float32> for multi-hot, as long as the ids' list): the values of a
             ``weighted`` feature's ids, never null (1.0 where the feature is missing)
    day      int32    optional: the time bucket used by ``split.method: day``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Dict, Iterator, List, Optional, Protocol, Sequence

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
    purpose by the format's labelling rule (counted, reported; not quarantined). ``weighted``: the
    sparse features whose ids carry values (a ``<feature>__weight`` column)."""

    name: str
    dense: List[str]
    sparse: List[str]
    multi_hot: Collection[str] = ()
    identity_sizes: Dict[str, int] = field(default_factory=dict)
    extra: List[str] = field(default_factory=list)
    inputs: List[str] = field(default_factory=list)
    dense_transform: str = "none"
    weighted: Collection[str] = ()


@dataclass(frozen=True)
class Section:
    """A piece of a source's input read by one rank: units [start, end) of input ``file`` (an index
    into the files the source deals: bytes cut at line starts, or rows for generated data).
    ``first_line`` is the 0-based number, within its file, of the section's first line; ``first_row``
    that line's row_id (the lines of the earlier files plus ``first_line``)."""

    file: int
    start: int
    end: int
    first_line: int = 0
    first_row: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start


class RawSource(Protocol):
    info: SourceInfo
    dropped_by_rule: Dict[str, int]

    def progress_total(self) -> int:
        """Total progress units (input bytes, or rows for generated data)."""

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        """Validated rows in a fixed order; bad rows go to ``quarantine`` when given. ``sections``:
        only these (placed: ``first_line`` and ``first_row`` set), in order; None: the whole input."""

    def deal(self, world_size: int) -> List[List[Section]]:
        """The input cut into ``world_size`` contiguous spans, rank r's sections at index r, in input
        order (``first_line`` and ``first_row`` not yet known: 0)."""

    def count_lines(self, section: Section) -> int:
        """Lines (or generated rows) in ``section``, as :meth:`chunks` numbers them."""
