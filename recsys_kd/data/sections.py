"""Dealing a source's input to ranks: contiguous spans of about equal size, numbered as one process
numbers them.

:func:`deal_files` cuts the input files, taken as one byte stream, at ``r * total / N`` for each rank r:
in a plain file at the first line start at or after that byte; a compressed file (``.gz``, ``.bz2`` ...),
which cannot be entered in the middle, at whichever of its ends is nearer (a source may cut its own
kinds of file elsewhere: ``format: table`` cuts Parquet at row group starts). Rank r's span follows rank
r - 1's, so the ranks' rows taken in rank order are the input's rows in order. Every rank computes the
same cut from the file sizes and a few bytes at each cut point; no communication.

A section's place (the number within its file of its first line, and that line's row_id) depends on
the lines before it: each rank counts its own sections' lines (``RawSource.count_lines``), the counts
are gathered, and :func:`place` numbers every section from them.

:func:`placed_sections` does all of it for one rank of a process group.

Example::

    spans = deal_files([Path("day_0"), Path("day_1.gz")], world_size=4)   # spans[r]: rank r's sections
    counts = [[source.count_lines(s) for s in span] for span in spans]      # each rank its own, gathered
    placed = place(spans, counts)                                           # first_line, first_row set
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from recsys_kd.data.rawtext import count_lines, is_compressed, line_start
from recsys_kd.data.source import RawSource, Section
from recsys_kd.distributed import from_rank, gather_outcome


# Where a span may end in a file: (path, byte offset in it, its size) -> the nearest allowed byte.
Boundary = Callable[[Path, int, int], int]


def text_boundary(path: Path, offset: int, size: int) -> int:
    """A text file's cut: the first line start at or after ``offset`` in a plain file; in a compressed
    one, whichever end is nearer."""
    if is_compressed(path):
        return 0 if offset < size / 2 else size
    return line_start(Path(path), offset)


def deal_files(files: Sequence[Path], world_size: int, boundary: Boundary = text_boundary) -> List[List[Section]]:
    """``files`` cut into ``world_size`` contiguous spans of sections (empty sections left out), each
    cut where ``boundary`` allows."""
    sizes = [os.path.getsize(path) for path in files]
    starts = [sum(sizes[:index]) for index in range(len(files))]
    total = sum(sizes)
    cuts = [0]
    for rank in range(1, world_size):
        cuts.append(max(cuts[-1], _cut(files, sizes, starts, rank * total // world_size, boundary)))
    cuts.append(total)
    spans = []
    for begin, end in zip(cuts, cuts[1:]):
        span = []
        for index, (start, size) in enumerate(zip(starts, sizes)):
            low, high = max(begin, start), min(end, start + size)
            if low < high:
                span.append(Section(file=index, start=low - start, end=high - start))
        spans.append(span)
    return spans


def _cut(files: Sequence[Path], sizes: List[int], starts: List[int], offset: int, boundary: Boundary) -> int:
    """The global byte where a span ending near ``offset`` ends: where ``boundary`` allows in its file."""
    for path, start, size in zip(files, starts, sizes):
        if start <= offset < start + size:
            return start + boundary(Path(path), offset - start, size)
    return offset


class DealtFiles:
    """What a source reading its ``files`` in order (each a delimited text file, plain or compressed)
    needs to be dealt to ranks: :meth:`~recsys_kd.data.source.RawSource.deal` and ``count_lines``."""

    files: List[Path]

    def deal(self, world_size: int) -> List[List[Section]]:
        return deal_files(self.files, world_size)

    def count_lines(self, section: Section) -> int:
        return count_lines(self.files[section.file], section)


def deal_rows(rows: int, chunk_rows: int, world_size: int) -> List[List[Section]]:
    """Generated rows ``[0, rows)`` in whole chunks of ``chunk_rows``, dealt as contiguous spans; a
    section's lines are its rows, numbered from its start."""
    chunks = -(-rows // chunk_rows)
    spans = []
    for rank in range(world_size):
        first, last = rank * chunks // world_size, (rank + 1) * chunks // world_size
        start, end = first * chunk_rows, min(last * chunk_rows, rows)
        spans.append([Section(file=0, start=start, end=end, first_line=start, first_row=start)] if start < end else [])
    return spans


def place(spans: Sequence[Sequence[Section]], counts: Sequence[Sequence[int]]) -> List[List[Section]]:
    """The sections with ``first_line`` and ``first_row`` set from every section's line count
    (``counts[r][i]``: lines of ``spans[r][i]``); spans are in input order."""
    lines_in_file: Dict[int, int] = {}
    row = 0
    placed = []
    for span, span_counts in zip(spans, counts):
        placed_span = []
        for section, lines in zip(span, span_counts):
            first_line = lines_in_file.get(section.file, 0)
            placed_span.append(dataclasses.replace(section, first_line=first_line, first_row=row))
            lines_in_file[section.file] = first_line + lines
            row += lines
        placed.append(placed_span)
    return placed


def placed_sections(source: RawSource, rank: int, world_size: int) -> List[Section]:
    """Rank ``rank``'s sections, placed (collective: every rank calls it): rank 0 deals the input,
    every rank counts its own sections' lines, and the gathered counts place every section."""
    def deal() -> List[List[Dict]]:
        return [[dataclasses.asdict(section) for section in span] for span in source.deal(world_size)]

    spans = [[Section(**section) for section in span] for span in from_rank(0, deal)]
    counts = gather_outcome(lambda: [source.count_lines(section) for section in spans[rank]])
    return place(spans, counts)[rank]
