"""libSVM and libFM/libFFM text files (``format: libsvm``): the sparse formats of LIBSVM's datasets page,
libFM and the field-aware releases (e.g. Criteo and Avazu as ``libffm``, Frappe as ``libfm``).

Format, one example per line (plain or .gz/.bz2)::

    <label> <index>:<value> <index>:<value> ...                libSVM (``layout: libsvm``)
    <label> <field>:<index>:<value> <field>:<index>:<value> ...  libFM / libFFM (``layout: libfm``)

as the LIBSVM README and libFFM's README specify: tokens separated by spaces or tabs, any number of
features (none at all is a valid line), a trailing ``# comment`` ignored. ``layout: auto`` takes the
layout of the first feature token of the first file.

What each part becomes:
    label   -1/+1 or 0/1 (``+1``, ``1.0`` ... as numbers): 1 -> 1.0, 0 and -1 -> 0.0; anything else is
            quarantined ``bad_label``
    libFM   one sparse feature per field, ``field_<f>``, whose value is the index (int64; ids by
            ``prepare.ids``); a field absent from a line is missing. The fields are
            ``libsvm.fields`` or, when that is empty, every field of the input (found by a scan before
            converting). A field named twice on a line is quarantined ``repeated_field``; one not in
            ``libsvm.fields``, ``unknown_field``
    libSVM  one multi-hot feature ``features``: the line's indices in order (the first ``max_length``
            when set)
    value   a feature's value must be a finite number (finite as float32 with ``values: weight``),
            else the row is quarantined ``bad_feature``; 0 means absent (the formats are sparse: a zero
            is not written). With ``libsvm.values: weight`` (the default, as libFM reads the format)
            every sparse feature is ``weighted``: its ids' values are kept, float32, in
            ``field_<f>__weight`` (1.0 where the field is missing, so a missing field keeps its
            learnt "missing" row as in ``presence``) or ``features__weight`` (list<float32>, aligned
            with the ids, truncated with them), and the models pool ``sum(value * embedding)``. With
            ``values: presence`` the value only marks the index present and is not stored. Binary
            (one-hot) releases, whose values are all 1, give the same model either way; ``presence``
            stores and reads less. Real-valued releases (HIGGS, SUSY, covtype, tf-idf text ...) need
            ``weight``: with ``presence`` a row of HIGGS is the same 28 indices as every other
    A malformed token (not ``int:number`` / ``int:int:number``) is quarantined ``bad_feature``.

``row_id`` is the 0-based physical line across the input files; a quarantined row's 1-based line
number is its would-be row_id + 1 within its file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_kd.data import fields
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import LINE, WHOLE_LINE, RawBlock, one_line, read_lines, section_blocks
from recsys_kd.data.schema import weight_column
from recsys_kd.data.sections import DealtFiles
from recsys_kd.data.source import LABEL, InputError, Section, SourceChunk, SourceInfo

INDEX = r"^[0-9]{1,18}$"
FEATURES = "features"


@dataclass
class LibSVMOptions:
    """``layout``: ``auto``, ``libsvm`` or ``libfm``; ``fields``: a libFM input's field numbers (empty:
    all found in the input); ``max_length``: most indices kept per libSVM line (0: all); ``values``:
    ``weight`` keeps each index's value (weighted features), ``presence`` keeps only that it is there."""

    layout: Literal["auto", "libsvm", "libfm"] = "auto"
    fields: List[int] = field(default_factory=list)
    max_length: int = 0
    values: Literal["weight", "presence"] = "weight"

    def validate(self) -> None:
        if self.max_length < 0:
            raise ValueError(f"libsvm.max_length must be >= 0 (0: no limit), got {self.max_length}")
        if any(f < 0 for f in self.fields) or len(set(self.fields)) != len(self.fields):
            raise ValueError(f"libsvm.fields must be distinct non-negative field numbers, got {self.fields}")


def field_name(number: int) -> str:
    return f"field_{number}"


@dataclass
class _Tokens:
    """A block's feature tokens, flattened: each token's row, field (-1 in libSVM), index, value, and
    which rows are bad (with reasons)."""

    row: np.ndarray
    field: np.ndarray
    index: np.ndarray
    value: np.ndarray
    labels: np.ndarray
    bad: np.ndarray
    reasons: List[Tuple[str, np.ndarray]]


class LibSVMSource(DealtFiles):
    """Streams validated rows of libSVM / libFM files.

    Example::

        source = LibSVMSource([Path("frappe.train.libfm")], LibSVMOptions())
        for chunk in source.chunks(quarantine):
            chunk.table   # row_id, label, features (list<int64>), features__weight (list<float32>)
                          # -- or field_0, field_0__weight, field_1, ... (int64, float32)
    """

    def __init__(self, files: List[Path], options: LibSVMOptions, block_bytes: int = 16 << 20) -> None:
        self.files = [Path(f) for f in files]
        self.options = options
        self.block_bytes = block_bytes
        self.layout = options.layout if options.layout != "auto" else self._detect_layout()
        self.fields: List[int] = sorted(options.fields)
        if self.layout == "libfm":
            self.fields = self.fields or self._scan_fields()
            sparse = [field_name(f) for f in self.fields]
        else:
            sparse = [FEATURES]
        self.info = SourceInfo(
            name="libsvm",
            dense=[],
            sparse=sparse,
            multi_hot=[FEATURES] if self.layout == "libsvm" else [],
            inputs=[str(f) for f in self.files],
            weighted=sparse if options.values == "weight" else [],
        )
        self.dropped_by_rule: Dict[str, int] = {}

    def progress_total(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        def read(path: Path, section: Optional[Section]) -> Iterator[RawBlock]:
            return read_lines(path, quarantine, block_bytes=self.block_bytes, section=section)

        for block, row_base in section_blocks(self.files, sections, read):
            yield SourceChunk(self._convert(block, row_base, quarantine), block.size)

    # ---------------------------------------------------------------------------- before converting

    def _detect_layout(self) -> str:
        """``libfm`` when the first feature token of the first file has two ':', else ``libsvm``."""
        for path in self.files:
            try:
                with pa.input_stream(str(path), compression="detect") as stream:
                    head = stream.read(1 << 20)
            except (OSError, EOFError, pa.ArrowInvalid) as error:
                if isinstance(error, FileNotFoundError):
                    raise
                raise InputError(f"{path}: cannot read (truncated or corrupt?): {one_line(error)}") from error
            for line in head.split(b"\n"):
                tokens = line.split(b"#", 1)[0].split()
                if len(tokens) > 1:
                    return "libfm" if tokens[1].count(b":") == 2 else "libsvm"
        return "libsvm"

    def _scan_fields(self) -> List[int]:
        """Every field number of the valid rows of the input (a pass before converting)."""
        found: set = set()
        for path in self.files:
            for block in read_lines(path, None, block_bytes=self.block_bytes):
                tokens = self._tokens(block.table.column(LINE).combine_chunks())
                good = ~tokens.bad[tokens.row]
                found.update(np.unique(tokens.field[good]).tolist())
        if not found:
            raise InputError(f"libsvm: no field:index:value feature in {', '.join(map(str, self.files))}")
        return sorted(int(f) for f in found)

    # -------------------------------------------------------------------------------- conversion

    def _tokens(self, lines: pa.Array) -> _Tokens:
        """Parses a block's lines (vectorized): labels, feature tokens, and the rows that are bad."""
        rows = len(lines)
        text = pc.replace_substring_regex(lines, r"#.*$", b"")
        text = pc.replace_substring(text, b"\t", b" ")
        split = pc.split_pattern(text, b" ")
        offsets = fields.list_offsets(split)
        tokens = pc.list_flatten(split)
        row_of = np.repeat(np.arange(rows), np.diff(offsets))
        present = np.asarray(pc.greater(pc.binary_length(tokens), 0).to_numpy(zero_copy_only=False), dtype=bool)
        tokens, row_of = tokens.filter(pa.array(present)), row_of[present]
        counts = np.bincount(row_of, minlength=rows)
        starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
        has_label = counts > 0
        first = np.zeros(len(row_of), dtype=bool)
        first[starts[has_label]] = True
        label_text = pa.array(np.full(rows, b"", dtype=object), pa.binary())
        if has_label.any():  # each row's first token, placed at its row (rows without tokens: empty)
            positions = np.zeros(rows, dtype=np.int64)
            positions[has_label] = np.arange(int(has_label.sum()))
            placed = tokens.filter(pa.array(first)).take(pa.array(positions))
            label_text = pc.if_else(pa.array(has_label), placed, label_text)
        labels, label_bad = _labels(label_text)
        features, feature_rows = tokens.filter(pa.array(~first)), row_of[~first]
        parts = pc.split_pattern(features, b":")
        sizes = np.diff(fields.list_offsets(parts))
        expected = 3 if self.layout == "libfm" else 2
        shaped = sizes == expected
        flat = pc.list_flatten(parts)
        starts_of = fields.list_offsets(parts)[:-1]
        pick = np.where(shaped, starts_of, 0)

        def part(k: int) -> pa.Array:
            return flat.take(pa.array(np.minimum(pick + k, max(len(flat) - 1, 0)))) if len(flat) else flat

        field_text = part(0) if expected == 3 else None
        index_text, value_text = part(expected - 2), part(expected - 1)
        malformed = ~shaped
        if len(features):
            malformed |= fields.invalid_mask(index_text, INDEX, allow_empty=False)
            malformed |= fields.invalid_mask(value_text, fields.NUMBER, allow_empty=False)
            if field_text is not None:
                malformed |= fields.invalid_mask(field_text, INDEX, allow_empty=False)
        index = _integers(index_text, malformed)
        field_numbers = _integers(field_text, malformed) if field_text is not None else np.full(len(index), -1)
        value = _floats(value_text, malformed)
        malformed |= ~np.isfinite(value)
        if self.options.values == "weight":  # the value is stored as float32: it must stay finite there
            with np.errstate(over="ignore"):
                malformed |= ~np.isfinite(value.astype(np.float32))
        reasons = [("bad_label", label_bad), ("bad_feature", _rows_with(feature_rows, malformed, rows))]
        kept = ~malformed & (value != 0)
        if self.layout == "libfm" and self.fields:
            unknown = kept & ~np.isin(field_numbers, self.fields)
            reasons.append(("unknown_field", _rows_with(feature_rows, unknown, rows)))
        if self.layout == "libfm":
            keys = feature_rows[kept].astype(np.int64) * (1 << 31) + field_numbers[kept]
            unique, repeats = np.unique(keys, return_counts=True)
            repeated = np.zeros(rows, dtype=bool)
            repeated[(unique[repeats > 1] // (1 << 31)).astype(np.int64)] = True
            reasons.append(("repeated_field", repeated))
        bad = np.zeros(rows, dtype=bool)
        for _, mask in reasons:
            bad |= mask
        return _Tokens(feature_rows[kept], field_numbers[kept], index[kept], value[kept], labels, bad, reasons)

    def _convert(self, block: RawBlock, row_base: int, quarantine: Optional[Quarantine]) -> pa.Table:
        lines = block.table.column(LINE).combine_chunks()
        rows = len(lines)
        tokens = self._tokens(lines)
        bad, reasons = fields.first_reason(tokens.reasons, rows)
        fields.quarantine_rows(quarantine, block.file, block.table, block.lines, bad, reasons, WHOLE_LINE)
        keep = ~bad
        new_row = np.cumsum(keep) - 1  # row of each kept input row in the output
        kept_rows = int(keep.sum())
        token_kept = keep[tokens.row]
        token_rows = new_row[tokens.row[token_kept]]
        columns = {
            "row_id": pa.array(row_base + block.lines[keep], pa.int64()),
            LABEL: pa.array(tokens.labels[keep], pa.float32()),
        }
        weighted = self.options.values == "weight"
        token_value = tokens.value[token_kept].astype(np.float32) if weighted else None
        if self.layout == "libfm":
            token_fields, token_index = tokens.field[token_kept], tokens.index[token_kept]
            for number in self.fields:
                at = token_fields == number
                values = np.zeros(kept_rows, dtype=np.int64)
                missing = np.ones(kept_rows, dtype=bool)
                values[token_rows[at]] = token_index[at]
                missing[token_rows[at]] = False
                columns[field_name(number)] = pa.array(values, pa.int64(), mask=missing)
                if weighted:
                    weights = np.ones(kept_rows, dtype=np.float32)
                    weights[token_rows[at]] = token_value[at]
                    columns[weight_column(field_name(number))] = pa.array(weights, pa.float32())
        else:
            counts = np.bincount(token_rows, minlength=kept_rows)
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            lists = pa.ListArray.from_arrays(offsets, pa.array(tokens.index[token_kept], pa.int64()))
            limit = self.options.max_length or None
            columns[FEATURES] = fields.truncate_lists(lists, limit)
            if weighted:  # no nulls in either list, so the same first ``limit`` entries are kept
                values = pa.ListArray.from_arrays(offsets, pa.array(token_value, pa.float32()))
                columns[weight_column(FEATURES)] = fields.truncate_lists(values, limit)
        return pa.table(columns)


def _labels(text: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Label tokens -> (1.0 for 1, 0.0 for 0 and -1; bad mask: anything else)."""
    bad = fields.invalid_mask(text, fields.NUMBER, allow_empty=False)
    values = _floats(text, bad)
    bad |= ~np.isin(values, (-1.0, 0.0, 1.0))
    return np.where(values == 1.0, 1.0, 0.0), bad


def _floats(text: pa.Array, bad: np.ndarray) -> np.ndarray:
    if len(text) == 0:
        return np.zeros(0)
    clean = pc.if_else(pa.array(~bad), text, pa.scalar(b"0", pa.binary()))
    return np.asarray(clean.cast(pa.string()).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _integers(text: Optional[pa.Array], bad: np.ndarray) -> np.ndarray:
    if text is None or len(text) == 0:
        return np.zeros(0 if text is None else len(text), dtype=np.int64)
    clean = pc.if_else(pa.array(~bad), text, pa.scalar(b"0", pa.binary()))
    return np.asarray(clean.cast(pa.string()).cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _rows_with(token_rows: np.ndarray, mask: np.ndarray, rows: int) -> np.ndarray:
    """Rows holding at least one token of ``mask``."""
    out = np.zeros(rows, dtype=bool)
    out[token_rows[mask]] = True
    return out
