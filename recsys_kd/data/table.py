"""Users' own logs (``format: table``): CSV, TSV, Parquet or JSON lines, read by a feature spec in the
recipe (``prepare.table``), so logs that are not Criteo/Avazu/MovieLens need no Python.

File formats (``file_format``, or ``auto`` from each file's name: ``.csv``, ``.tsv``/``.tab``,
``.parquet``/``.pq``, ``.jsonl``/``.ndjson``/``.json``; a ``.gz``/``.bz2`` suffix on text files is
decompressed on the fly):

    csv, tsv  one record per line; a field may be quoted (RFC 4180: ``quote_char``, default ``"``), so
              hold the separator and doubled quotes, but not a line break (such a record is
              quarantined: :mod:`~recsys_kd.data.rawtext`); the first line names the columns
              (``header: true``; quoted names too), or ``columns`` does; streamed in blocks of
              ``block_bytes``
    parquet   any column types (numbers, strings, timestamps, lists); streamed one batch of rows at a
              time, reading only the spec's columns
    jsonl     one JSON object per line; a missing key is a missing value; multi-hot values may be
              JSON arrays or separated strings

Every value is read as its text (an integer 5 is "5", a float 0.5 is "0.5"), so the same logical data
in any of the four formats gives the same dataset; categorical values are compared as that text.

The spec and what each column becomes: :mod:`recsys_kd.data.table_spec`.

Features keep their column names, sparse in the order sparse, bucketized dense, multi-hot.

``row_id`` is the record's 0-based index in the input (files in order, header lines not counted), so
it is the same in every file format. Bad rows are quarantined with their file and 1-based line (for
Parquet: row number) and a reason naming the column: ``bad_label:<col>``, ``bad_number:<col>``,
``bad_time:<col>``, ``invalid_utf8:<col>``, ``bad_value:<col>`` (a JSON object or array where a
scalar belongs), ``bad_json``, plus the raw-text reasons of :mod:`~recsys_kd.data.rawtext`.
A column missing from a file is an error naming the file and the column.

On N ranks (:meth:`TableSource.deal`) the input is cut as the other text formats' is: plain CSV/TSV/JSON
lines at line starts (every rank reads a CSV/TSV header from its file's start), a compressed file whole,
a Parquet file at row group starts; a section's "lines" are its records (header not counted), so the
gathered counts place every row_id as one process numbers it. Standardize statistics are each rank's
exact sums over its training rows, gathered and added (:meth:`TableSource.fit`).

Longer than 500 lines because the four file readers, each with its section (rank share) reading, and
the vectorized column conversions belong to the one spec they implement.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Counter, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_kd.data import fields
from recsys_kd.data import split as splitting
from recsys_kd.data.moments import Moments
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import (LINE, MalformedLine, count_lines, join_fields, one_line, read_delimited,
                                    read_lines, split_line)
from recsys_kd.data.schema import ROW_ID
from recsys_kd.data.sections import deal_files, text_boundary
from recsys_kd.data.source import DAY, LABEL, InputError, Section, SourceChunk, SourceInfo
from recsys_kd.data.table_spec import DenseColumn, MultiHotColumn, TableOptions
from recsys_kd.distributed import gather_outcome

DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
SECONDS_PER_DAY = 86400
PARQUET_BATCH_ROWS = 65536
_DELIMITERS = {"csv": ",", "tsv": "\t"}
SUFFIXES = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}


@dataclass
class _Block:
    """Rows of one file as text columns: ``columns`` (binary/string, or list<string> for list-valued
    Parquet/JSON columns), each row's 0-based ``records`` index in the file and 1-based ``lines``;
    ``text(i)`` renders row i for the quarantine; ``size`` is the progress in bytes; ``records_end``
    the records of the file read so far, refused ones included."""

    file: str
    columns: Dict[str, pa.Array]
    records: np.ndarray
    lines: np.ndarray
    text: Callable[[int], str]
    size: int
    records_end: int


def file_format(path: Path, configured: str) -> str:
    """The format of ``path``: ``configured``, or with ``auto`` by its suffix (after .gz/.bz2)."""
    if configured != "auto":
        return configured
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes.pop()
    if suffixes and suffixes[-1] in SUFFIXES:
        return SUFFIXES[suffixes[-1]]
    raise InputError(f"{path}: cannot tell the file format from the name; set prepare.table.file_format")


class TableSource:
    """Streams a user's table files as validated rows by a :class:`TableOptions` spec.

    Args:
        files: the input files, read in this order.
        options: the feature spec.
        split: the split ``prepare`` makes (standardize statistics are taken over its training rows).
        block_bytes: block size of the text formats.

    Example::

        options = TableOptions(label=LabelRule(column="clicked"), sparse=["user", "item"],
                               dense=[DenseColumn("price", transform="log")])
        source = TableSource([Path("logs.csv")], options, SplitConfig())
        source.fit()   # standardize statistics (else the first chunks() call fits them)
        for chunk in source.chunks(quarantine):
            chunk.table   # row_id, label, price (float32), user, item (string)
    """

    def __init__(
        self, files: List[Path], options: TableOptions, split: splitting.SplitConfig, block_bytes: int = 16 << 20
    ) -> None:
        self.files = [Path(f) for f in files]
        self.options = options
        self.split = split
        self.block_bytes = block_bytes
        self.formats = [file_format(path, options.file_format) for path in self.files]
        if options.time is None and split.method == "day":
            raise InputError("split.method 'day' needs prepare.table.time (the column giving each row's day)")
        bucketized = [d.column for d in options.dense if d.transform == "bucketize"]
        multi_hot = [m.column for m in options.multi_hot]
        self.info = SourceInfo(
            name="table",
            dense=[d.column for d in options.dense if d.transform != "bucketize"],
            sparse=[*options.sparse, *bucketized, *multi_hot],
            multi_hot=multi_hot,
            inputs=[str(f) for f in self.files],
        )
        self.dropped_by_rule: Dict[str, int] = {}
        self.standardized = [d.column for d in options.dense if d.transform == "standardize"]
        self.statistics: Optional[Dict[str, Tuple[float, float]]] = None  # by fit()
        # Every CSV/TSV file's columns, read and checked up front: a rank whose share misses a file's
        # start (or an empty file, dealt to no rank) still fails on a missing column as one process does.
        self.names = {index: self._columns(path, _DELIMITERS[kind]) for index, (path, kind)
                      in enumerate(zip(self.files, self.formats)) if kind in _DELIMITERS}

    @property
    def dense_transform(self) -> str:
        """Each dense feature's transform, with the fitted statistics (for ``schema.json``)."""
        parts = []
        for dense in self.options.dense:
            if dense.transform == "log":
                parts.append(f"{dense.column}: log1p(max(v, 0))")
            elif dense.transform == "clip":
                parts.append(f"{dense.column}: clip(v, {dense.min}, {dense.max})")
            elif dense.transform == "standardize":
                mean, std = self.statistics[dense.column]
                parts.append(f"{dense.column}: (v - {mean!r}) / {std!r}")
            elif dense.transform == "none":
                parts.append(f"{dense.column}: v")
        return "; ".join([*parts, "missing -> 0"]) if parts else "none"

    def progress_total(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        if self.statistics is None:
            if sections is not None:
                raise RuntimeError("TableSource.fit(sections, rank) must run on every rank before chunks(sections)")
            self.fit()
        for table, size in self._converted(quarantine, sections):
            yield SourceChunk(self._standardize(table), size)

    # ---------------------------------------------------------------------------------- N ranks

    def deal(self, world_size: int) -> List[List[Section]]:
        """The files cut into ``world_size`` spans: text at line starts (compressed: whole), Parquet at
        row group starts."""
        return deal_files(self.files, world_size, self._boundary)

    def _boundary(self, path: Path, offset: int, size: int) -> int:
        if self.formats[self.files.index(path)] != "parquet":
            return text_boundary(path, offset, size)
        later = [start for start in _row_group_starts(path) if start >= offset]
        return later[0] if later else size  # the first group's start counts as the file's: see _row_group_starts

    def count_lines(self, section: Section) -> int:
        """The records of ``section`` (lines, a CSV/TSV header not counted; Parquet rows)."""
        path, kind = self.files[section.file], self.formats[section.file]
        if kind == "parquet":
            return sum(rows for _, rows in _section_row_groups(path, section))
        lines = count_lines(path, section)
        header = kind in ("csv", "tsv") and self.options.header and section.start == 0
        return max(lines - 1, 0) if header else lines

    def fit(self, sections: Optional[Sequence[Section]] = None, rank: int = 0) -> None:
        """Fits the standardize statistics over the training split's rows of the whole input (and sets
        ``info.dense_transform``). On N ranks every rank calls it (collective) with its placed
        ``sections`` and its ``rank``: each sums its own rows exactly; the sums are gathered and added, so
        the figures are one process's, bit for bit."""
        self.statistics = self._fit_statistics(sections, rank) if self.standardized else {}
        self.info.dense_transform = self.dense_transform

    # ------------------------------------------------------------------------------------ passes

    def _converted(
        self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None
    ) -> Iterator[Tuple[pa.Table, int]]:
        """Converted rows (standardized columns still raw float64, NaN = missing) and their bytes, of
        the whole input or of ``sections`` (placed: a section's first record's row_id is ``first_row``)."""
        dropped: Counter[str] = collections.Counter()
        record_base = 0
        pieces = [(index, None) for index in range(len(self.files))] if sections is None else [
            (section.file, section) for section in sections]
        for index, section in pieces:
            base = record_base if section is None else section.first_row - section.first_line
            records = 0
            for block in self._blocks(index, quarantine, section):
                yield self._convert(block, base, quarantine, dropped), block.size
                records = block.records_end
            record_base += records
        # Replaced, not added to, at the end of each full pass: a second pass counts the same rows.
        self.dropped_by_rule = dict(sorted(dropped.items()))

    def _fit_statistics(self, sections: Optional[Sequence[Section]], rank: int) -> Dict[str, Tuple[float, float]]:
        """Mean and std of each standardized column over the training split's rows (exact sums, so
        any chunking or dealing gives the same figures); a count-based split counts the kept rows first
        (on N ranks: every rank's, so each knows its first row's position)."""
        split = self.split
        kept_rows, ranks, position = None, None, 0
        if split.needs_count:
            counts = gather_outcome(lambda: sum(table.num_rows for table, _ in self._converted(None, sections)))
            kept_rows, position = sum(counts), sum(counts[:rank])
            ranks = splitting.permutation_ranks(kept_rows, split.seed) if split.method == "permutation" else None

        def own_moments() -> Dict[str, List]:
            moments = {name: Moments() for name in self.standardized}
            start = position
            for table, _ in self._converted(None, sections):
                train = splitting.assign(split, table, start, kept_rows, ranks) == splitting.TRAIN
                start += table.num_rows
                for name in self.standardized:
                    values = table.column(name).to_numpy()
                    moments[name].add(values[train & ~np.isnan(values)])
            return {name: m.to_json() for name, m in moments.items()}

        gathered = gather_outcome(own_moments)
        return {name: sum((Moments.from_json(g[name]) for g in gathered), Moments()).mean_std()
                for name in self.standardized}

    def _standardize(self, table: pa.Table) -> pa.Table:
        for name in self.standardized:
            mean, std = self.statistics[name]
            values = table.column(name).to_numpy()
            out = np.where(np.isnan(values), 0.0, (values - mean) / std).astype(np.float32)
            table = table.set_column(table.column_names.index(name), name, pa.array(out))
        return table

    # ------------------------------------------------------------------------------- file readers

    def _blocks(self, index: int, quarantine: Optional[Quarantine], section: Optional[Section]) -> Iterator[_Block]:
        """The blocks of file ``index``, or of its ``section``; records numbered within the file either way."""
        path, kind = self.files[index], self.formats[index]
        if kind in _DELIMITERS:
            return self._delimited_blocks(path, _DELIMITERS[kind], self.names[index], quarantine, section)
        if kind == "jsonl":
            return self._json_blocks(path, quarantine, section)
        return self._parquet_blocks(path, section)

    def _header(self, path: Path, delimiter: str) -> List[str]:
        if not self.options.header:
            return list(self.options.columns)
        with pa.input_stream(str(path), compression="detect") as stream:
            first = stream.read(1 << 20).split(b"\n", 1)[0]
        first = first.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r")
        try:
            return [name.decode("utf-8") for name in split_line(first, delimiter, self.options.quote)]
        except UnicodeDecodeError:
            raise InputError(f"{path}:1: the header line is not UTF-8") from None
        except MalformedLine as error:
            raise InputError(f"{path}:1: the header line is malformed ({error}): {first.decode('utf-8', 'replace')}") from None

    def _check_columns(self, path: Path, names: List[str], where: str) -> None:
        missing = [name for name in self.options.needed if name not in names]
        if missing:
            raise InputError(f"{path}: no column {', '.join(map(repr, missing))} {where} (has: {', '.join(names)})")

    def _columns(self, path: Path, delimiter: str) -> List[str]:
        """A CSV/TSV file's column names (its header, or ``columns``), checked against the spec."""
        try:
            names = self._header(path, delimiter)
        except (OSError, EOFError, pa.ArrowInvalid) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise InputError(f"{path}: cannot read (truncated or corrupt?): {one_line(error)}") from error
        self._check_columns(path, names, "in the header" if self.options.header else "in table.columns")
        return names

    def _delimited_blocks(
        self, path: Path, delimiter: str, names: List[str], quarantine: Optional[Quarantine], section: Optional[Section]
    ) -> Iterator[_Block]:
        offset = 1 if self.options.header else 0
        if section is not None and section.start > 0:  # numbered by records; read_delimited by lines
            section = dataclasses.replace(section, first_line=section.first_line + offset)
        quote = self.options.quote
        blocks = read_delimited(path, names, delimiter, quarantine, skip_header=self.options.header,
                                block_bytes=self.block_bytes, section=section, quote_char=quote)
        for raw in blocks:
            table = raw.table

            def text(index: int, table=table) -> str:
                values = [table.column(i)[index].as_py() or b"" for i in range(table.num_columns)]
                return join_fields(values, delimiter, quote).decode("utf-8", "replace")

            columns = {name: table.column(name).combine_chunks() for name in self.options.needed}
            yield _Block(str(path), columns, raw.lines - offset, raw.lines + 1, text, raw.size, max(raw.line_end - offset, 0))

    def _json_blocks(self, path: Path, quarantine: Optional[Quarantine], section: Optional[Section]) -> Iterator[_Block]:
        needed = self.options.needed
        separators = {m.column: m.separator for m in self.options.multi_hot}
        for raw in read_lines(path, quarantine, block_bytes=self.block_bytes, section=section):
            lines = raw.table.column(LINE).combine_chunks().to_pylist()
            values: Dict[str, list] = {name: [] for name in needed}
            good = np.ones(len(lines), dtype=bool)
            reasons: Dict[int, str] = {}
            for index, line in enumerate(lines):
                row, reason = _json_row(line, needed, separators)
                if reason is not None:
                    good[index], reasons[index] = False, reason
                    continue
                for name, value in zip(needed, row):
                    values[name].append(value)
            if quarantine is not None:
                for index in np.flatnonzero(~good):
                    text = lines[index].decode("utf-8", "replace")
                    quarantine.add(str(path), int(raw.lines[index]) + 1, reasons[int(index)], text)
            columns = {
                name: pa.array(column, pa.list_(pa.string()) if name in separators else pa.string())
                for name, column in values.items()
            }
            kept = raw.lines[good]
            kept_lines = [line for line, ok in zip(lines, good) if ok]
            yield _Block(str(path), columns, kept, kept + 1,
                         lambda i, kept_lines=kept_lines: kept_lines[i].decode("utf-8", "replace"), raw.size, raw.line_end)

    def _parquet_blocks(self, path: Path, section: Optional[Section]) -> Iterator[_Block]:
        parquet = _parquet_file(path)
        arrow_schema = parquet.schema_arrow
        self._check_columns(path, arrow_schema.names, "in the file")
        needed = self.options.needed
        listed = {m.column for m in self.options.multi_hot}
        for name in needed:
            kind = arrow_schema.field(name).type
            if name not in listed and (pa.types.is_nested(kind) or pa.types.is_dictionary(kind)):
                raise InputError(f"{path}: column {name!r} holds {kind}; only multi_hot columns may hold lists")
        groups = _section_row_groups(path, section) if section is not None else None
        if groups == []:  # a share of the file's bytes holding no row group's start
            return
        rows = parquet.metadata.num_rows if groups is None else sum(count for _, count in groups)
        size = os.path.getsize(path) if section is None else section.size
        first = 0 if groups is None or not groups else sum(
            parquet.metadata.row_group(group).num_rows for group in range(groups[0][0]))
        start = first
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=needed,
                                              row_groups=None if groups is None else [group for group, _ in groups]):
                columns = {name: _parquet_text(batch.column(name)) for name in needed}
                records = np.arange(start, start + batch.num_rows, dtype=np.int64)

                def text(index: int, columns=columns) -> str:
                    values = {name: column[index].as_py() for name, column in columns.items()}
                    return json.dumps(values, ensure_ascii=False, default=lambda raw: raw.decode("utf-8", "replace"))

                done = start - first
                progress = size * (done + batch.num_rows) // max(rows, 1) - size * done // max(rows, 1)
                yield _Block(str(path), columns, records, records + 1, text, progress, start + batch.num_rows)
                start += batch.num_rows
        except (OSError, pa.ArrowInvalid) as error:
            raise InputError(f"{path}: cannot read on (truncated or corrupt?): {one_line(error)}") from error

    # -------------------------------------------------------------------------------- conversion

    def _convert(
        self, block: _Block, record_base: int, quarantine: Optional[Quarantine], dropped: Counter[str]
    ) -> pa.Table:
        """The block's valid rows as output columns; the others go to the quarantine."""
        options = self.options
        rows = len(block.records)
        checks: List[Tuple[str, np.ndarray]] = []
        label, label_bad, drop = self._label(block.columns[options.label.column])
        checks.append((f"bad_label:{options.label.column}", label_bad))
        numbers = {}
        for dense in options.dense:
            values, bad = _numbers(block.columns[dense.column])
            if dense.transform == "standardize":
                bad |= ~np.isfinite(np.square(np.nan_to_num(values)))  # its square must sum
            numbers[dense.column] = values
            checks.append((f"bad_number:{dense.column}", bad))
        texts = {}
        for name in options.sparse:
            texts[name], bad = _tokens(block.columns[name])
            checks.append((f"invalid_utf8:{name}", bad))
        lists = {}
        for multi in options.multi_hot:
            lists[multi.column], bad = _lists(block.columns[multi.column], multi)
            checks.append((f"invalid_utf8:{multi.column}", bad))
        days = None
        if options.time is not None:
            days, bad = _days(block.columns[options.time.column], options.time.unit)
            checks.append((f"bad_time:{options.time.column}", bad))
        bad, reasons = fields.first_reason(checks, rows)
        if quarantine is not None:
            for index in np.flatnonzero(bad):
                quarantine.add(block.file, int(block.lines[index]), reasons[int(index)], block.text(int(index)))
        dropping = drop & ~bad
        if dropping.any():
            raw = block.columns[options.label.column].filter(pa.array(dropping)).cast(pa.string()).to_pylist()
            dropped.update(f"label_{value}" for value in raw)
        keep = ~bad & ~dropping
        mask = pa.array(keep, pa.bool_())
        columns = {
            ROW_ID: pa.array(record_base + block.records[keep], pa.int64()),
            LABEL: pa.array(label[keep], pa.float32()),
        }
        for dense in options.dense:
            if dense.transform != "bucketize":
                columns[dense.column] = _transformed(numbers[dense.column][keep], dense)
        for name in options.sparse:
            columns[name] = texts[name].filter(mask)
        for dense in options.dense:
            if dense.transform == "bucketize":
                values = numbers[dense.column][keep]
                buckets = np.searchsorted(np.asarray(dense.boundaries, np.float64), values, side="right")
                columns[dense.column] = pa.array(buckets.astype(np.int64), pa.int64(), mask=np.isnan(values))
        for multi in options.multi_hot:
            columns[multi.column] = lists[multi.column].filter(mask)
        if days is not None:
            columns[DAY] = pa.array(days[keep], pa.int32())
        return pa.table(columns)

    def _label(self, column: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label 0/1 float, bad mask, dropped-by-rule mask) of a label column."""
        rule = self.options.label
        nothing = np.zeros(len(column), dtype=bool)
        if rule.values:
            text = column.cast(pa.string()) if not pa.types.is_binary(column.type) else column
            keys = list(rule.values)
            lookup = pc.index_in(text, value_set=pa.array(keys, text.type))
            position = np.asarray(lookup.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            labels = np.array([rule.values[k] for k in keys] + [0.0])[position]
            drop = np.asarray(pc.is_in(text, value_set=pa.array(rule.drop, text.type)).to_numpy(zero_copy_only=False),
                              dtype=bool) if rule.drop else nothing
            return labels, (position < 0) & ~drop, drop
        values, bad = _numbers(column)
        missing = np.isnan(values)
        if rule.threshold is not None:
            return np.where(values >= rule.threshold, 1.0, 0.0), bad | missing, nothing
        return np.where(values == 1, 1.0, 0.0), bad | missing | ~np.isin(values, (0.0, 1.0)), nothing


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise InputError(f"{path}: cannot read as Parquet: {one_line(error)}") from error


def _row_group_starts(path: Path) -> List[int]:
    """The byte where each row group of Parquet file ``path`` starts (its first column chunk's first page)."""
    metadata = _parquet_file(path).metadata
    starts = []
    for group in range(metadata.num_row_groups):
        chunks = [metadata.row_group(group).column(c) for c in range(metadata.num_columns)]
        starts.append(min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks))
    return [0, *starts[1:]] if starts else starts  # the magic bytes before the first go with it


def _section_row_groups(path: Path, section: Section) -> List[Tuple[int, int]]:
    """(index, rows) of the row groups of Parquet file ``path`` that start inside ``section``'s bytes."""
    metadata = _parquet_file(path).metadata
    return [(group, metadata.row_group(group).num_rows) for group, start in enumerate(_row_group_starts(path))
            if section.start <= start < section.end]


def _json_row(line: bytes, needed: List[str], separators: Dict[str, str]) -> Tuple[list, Optional[str]]:
    """One JSON line -> (the needed columns' texts, None) or ([], reason). Multi-hot columns come out
    as lists: a JSON array's items, or a string split at the column's separator (empty tokens dropped,
    as :func:`~recsys_kd.data.fields.split_tokens` does for text formats)."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return [], "bad_json"
    if not isinstance(record, dict):
        return [], "bad_json"
    row = []
    for name in needed:
        value = record.get(name)
        if name in separators and isinstance(value, list):
            items = [_json_scalar(item) for item in value]
            if any(item is _NOT_SCALAR for item in items):
                return [], f"bad_value:{name}"
            row.append(items)
            continue
        text = _json_scalar(value)
        if text is _NOT_SCALAR:
            return [], f"bad_value:{name}"
        if name in separators:
            text = [token for token in (text or "").split(separators[name]) if token]
        row.append(text)
    return row, None


_NOT_SCALAR = object()


def _json_scalar(value):
    """A JSON scalar as text (None when missing or null); ``_NOT_SCALAR`` for an object or array."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _NOT_SCALAR


def _parquet_text(column: pa.Array) -> pa.Array:
    """A Parquet column as text: lists as list<string>, binary kept (checked later), the rest cast."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.cast(column, pa.list_(pa.string()))
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type) or pa.types.is_string(column.type):
        return column
    return pc.cast(column, pa.string())


def _numbers(column: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Text -> (float64 values, NaN where missing or bad; bad mask: not a finite number)."""
    text = column.fill_null("" if pa.types.is_string(column.type) else b"")
    empty = np.asarray(pc.equal(pc.binary_length(text), 0).to_numpy(zero_copy_only=False), dtype=bool)
    bad = fields.invalid_mask(text, fields.NUMBER, allow_empty=True)
    usable = pa.array(~bad & ~empty, pa.bool_())
    zero = pa.scalar("0" if pa.types.is_string(text.type) else b"0", text.type)
    values = np.array(pc.if_else(usable, text, zero).cast(pa.string()).cast(pa.float64()).to_numpy(
        zero_copy_only=False), dtype=np.float64)
    bad |= ~np.isfinite(values)  # "1e999"
    values[bad | empty] = np.nan
    return values, bad


def _tokens(column: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """Text -> (string, empty = null; rows whose bytes are not UTF-8)."""
    bad = fields.utf8_invalid_mask(column) if not pa.types.is_string(column.type) else np.zeros(len(column), bool)
    if bad.any():
        column = pc.if_else(pa.array(bad), pa.scalar(b"", column.type), column)
    return fields.to_token(column), bad


def _lists(column: pa.Array, spec: MultiHotColumn) -> Tuple[pa.Array, np.ndarray]:
    """Text split at the separator, or a list column's values -> (list<string>, non-UTF-8 rows)."""
    limit = spec.max_length or None
    if pa.types.is_list(column.type):
        values = pc.list_flatten(column)
        blank = pc.if_else(pc.equal(pc.utf8_length(values), 0), pa.scalar(None, pa.string()), values)
        offsets = pa.array(fields.list_offsets(column).astype(np.int32))
        return fields.truncate_lists(pa.ListArray.from_arrays(offsets, blank), limit), np.zeros(len(column), bool)
    tokens, bad = _tokens(column)
    return fields.split_tokens(tokens, spec.separator, limit), bad


def _days(column: pa.Array, unit: str) -> Tuple[np.ndarray, np.ndarray]:
    """Time values -> (days since 1970-01-01 UTC as int32, bad mask: missing or unreadable)."""
    if unit == "date":
        text = column.fill_null("" if pa.types.is_string(column.type) else b"")
        bad = fields.invalid_mask(text, DATE, allow_empty=False)
        placeholder = pa.scalar("1970-01-01" if pa.types.is_string(text.type) else b"1970-01-01", text.type)
        dates = pc.utf8_slice_codeunits(pc.if_else(pa.array(~bad), text, placeholder).cast(pa.string()), 0, 10)
        parsed = pc.strptime(dates, format="%Y-%m-%d", unit="s", error_is_null=True)
        bad |= np.asarray(parsed.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        seconds = np.asarray(parsed.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return (seconds // SECONDS_PER_DAY).astype(np.int32), bad
    values, bad = _numbers(column)
    bad |= np.isnan(values)
    scale = SECONDS_PER_DAY * (1000 if unit == "milliseconds" else 1)
    days = np.floor(np.nan_to_num(values) / scale)
    bad |= np.abs(days) > np.iinfo(np.int32).max
    return np.where(bad, 0, days).astype(np.int32), bad


def _transformed(values: np.ndarray, dense: DenseColumn) -> pa.Array:
    """A dense column's transform (standardize is applied after fitting: raw float64 here)."""
    if dense.transform == "standardize":
        return pa.array(values, pa.float64())
    if dense.transform == "log":
        out = np.log1p(np.maximum(values, 0.0))
    elif dense.transform == "clip":
        low = -np.inf if dense.min is None else dense.min
        high = np.inf if dense.max is None else dense.max
        out = np.clip(values, low, high)
    else:
        out = values
    return pa.array(np.where(np.isnan(values), 0.0, out).astype(np.float32))
