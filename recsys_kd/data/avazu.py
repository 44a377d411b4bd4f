"""Avazu click logs: the Kaggle "Click-Through Rate Prediction" ``train.csv`` (plain or .gz) and
files split from it.

Format: comma-separated, no quoting, 24 fields per line::

    id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,
    device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21

A file may start with that header line or not (split files often lack it): a first line starting
with ``id,click,hour`` is taken as the header. The Kaggle ``test.csv`` (no ``click`` column) is
refused with an error, as it has no labels.

What each column becomes:
    id      dropped: a unique impression id, not a feature
    click   ``label`` (float32 0/1); anything else is quarantined ``bad_label``
    hour    YYMMDDHH (year 20YY): the sparse features ``hour_of_day`` (0-23) and ``weekday``
            (0 = Monday .. 6), both int64, and ``day`` (int32 days since 1970-01-01, for day
            splits); a value that is not 8 digits naming a real date and hour is quarantined
            ``bad_hour``
    others  the 21 remaining columns (C1, banner_pos, site_*, app_*, device_*, C14..C21) are
            sparse string features kept as they are (hashed hex ids, small integers); empty =
            missing (null); a value that is not a printable ASCII token is quarantined
            ``invalid_utf8:<column>`` (its bytes are not UTF-8) or ``bad_token:<column>``

``row_id`` is the 0-based physical line across the input files, header lines included (as for
Criteo), so a quarantined row's 1-based line number is its would-be row_id + 1 within its file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_kd.data import fields
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import RawBlock, one_line, read_delimited, section_blocks
from recsys_kd.data.sections import DealtFiles
from recsys_kd.data.source import DAY, LABEL, InputError, Section, SourceChunk, SourceInfo

HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)
COLUMNS = HEADER.split(",")
CLICK = "click"
HOUR = "hour"
RAW_FEATURES = COLUMNS[3:]
HOUR_FEATURES = ["hour_of_day", "weekday"]
SPARSE_FEATURES = RAW_FEATURES + HOUR_FEATURES
HEADER_PREFIX = b"id,click,hour"
UNLABELLED_HEADER_PREFIX = b"id,hour,"
UTF8_BOM = b"\xef\xbb\xbf"
# 1970-01-01 was a Thursday: weekday 3 when Monday is 0 (Python's datetime.weekday()).
EPOCH_WEEKDAY = 3


@dataclass
class HourFields:
    """What the ``hour`` column yields per row; the other arrays are meaningless where not ``valid``."""

    valid: np.ndarray  # bool
    hour_of_day: np.ndarray  # int64, 0-23
    weekday: np.ndarray  # int64, 0 = Monday
    day: np.ndarray  # int32, days since 1970-01-01


def hour_fields(hours: pa.Array) -> HourFields:
    """YYMMDDHH text (binary or string, year 20YY) -> hour of day, weekday and day number.

    A row is valid when it is exactly 8 digits naming a real calendar date (leap years included)
    and an hour 0-23. Vectorized: the date is turned into days via numpy's calendar arithmetic.
    """
    digits = ~fields.invalid_mask(hours, r"^[0-9]{8}$", allow_empty=False)
    # Non-digit rows get a harmless placeholder so the whole column casts to integers at once.
    placeholder = pa.scalar(b"70010100" if pa.types.is_binary(hours.type) else "70010100", hours.type)
    text = pc.if_else(pa.array(digits, pa.bool_()), hours, placeholder).cast(pa.string())
    numbers = np.asarray(text.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    year = 2000 + numbers // 1_000_000
    month = numbers // 10_000 % 100
    day_of_month = numbers // 100 % 100
    hour = numbers % 100
    months = (year - 1970) * 12 + np.clip(month, 1, 12) - 1
    month_start = months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    month_length = (months + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) - month_start
    valid = (
        digits
        & (month >= 1)
        & (month <= 12)
        & (day_of_month >= 1)
        & (day_of_month <= month_length)
        & (hour <= 23)
    )
    days = month_start + day_of_month - 1
    return HourFields(
        valid=valid,
        hour_of_day=hour,
        weekday=(days + EPOCH_WEEKDAY) % 7,
        day=days.astype(np.int32),
    )


def has_header(path: Path) -> bool:
    """Whether ``path`` starts with the Avazu header line (a UTF-8 byte order mark is tolerated)."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            first_line = stream.read(4096).split(b"\n", 1)[0]
    except (OSError, EOFError, pa.ArrowInvalid) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise InputError(f"{path}: cannot read (truncated or corrupt?): {one_line(error)}") from error
    if first_line.startswith(UTF8_BOM):
        first_line = first_line[len(UTF8_BOM) :]
    if first_line.startswith(UNLABELLED_HEADER_PREFIX):
        raise InputError(
            f"{path}: header has no 'click' column (the Kaggle test.csv?); avazu needs labelled rows "
            f"with the columns {HEADER}"
        )
    return first_line.startswith(HEADER_PREFIX)


class AvazuSource(DealtFiles):
    """Streams validated Avazu rows from one or more files, in the order given.

    Example::

        source = AvazuSource([Path("train.csv.gz")])
        for chunk in source.chunks(quarantine):
            chunk.table   # row_id, label, C1..C21 and the other raw features (string),
                          # hour_of_day, weekday (int64), day (int32)
    """

    def __init__(self, files: List[Path], block_bytes: int = 16 << 20) -> None:
        self.files = [Path(f) for f in files]
        self.block_bytes = block_bytes
        self.info = SourceInfo(
            name="avazu", dense=[], sparse=list(SPARSE_FEATURES), inputs=[str(f) for f in self.files]
        )
        self.dropped_by_rule: Dict[str, int] = {}

    def progress_total(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        def read(path: Path, section: Optional[Section]) -> Iterator[RawBlock]:
            return read_delimited(path, COLUMNS, ",", quarantine, skip_header=has_header(path),
                                  block_bytes=self.block_bytes, section=section)

        for block, row_base in section_blocks(self.files, sections, read):
            yield SourceChunk(self._convert(block, row_base, quarantine), block.size)

    def _convert(self, block: RawBlock, row_base: int, quarantine: Optional[Quarantine]) -> pa.Table:
        """The block's valid rows as output columns; the others go to the quarantine."""
        table = block.table
        hours = hour_fields(table.column(HOUR).combine_chunks())
        patterns = [(CLICK, "bad_label", r"^[01]$", False)]
        patterns += [(name, f"bad_token:{name}", fields.TOKEN, True) for name in RAW_FEATURES]
        label_check, *token_checks = fields.check_columns(table, patterns)
        checks = [label_check, ("bad_hour", ~hours.valid)]
        for name, (reason, invalid) in zip(RAW_FEATURES, token_checks):
            if invalid.any():
                # The UTF-8 check is slower, so it only runs to name the reason of rows already refused.
                not_utf8 = fields.utf8_invalid_mask(table.column(name).combine_chunks()) & invalid
                checks += [(f"invalid_utf8:{name}", not_utf8), (reason, invalid)]
        bad, reasons = fields.first_reason(checks, table.num_rows)
        lines = block.lines
        if bad.any():
            fields.quarantine_rows(quarantine, block.file, table, lines, bad, reasons, ",")
            keep = ~bad
            table, lines = table.filter(pa.array(keep)), lines[keep]
            hours = HourFields(hours.valid[keep], hours.hour_of_day[keep], hours.weekday[keep], hours.day[keep])
        columns = {
            "row_id": pa.array(row_base + lines, pa.int64()),
            LABEL: fields.to_int64(table.column(CLICK).combine_chunks()).cast(pa.float32()),
        }
        for name in RAW_FEATURES:
            columns[name] = fields.to_token(table.column(name).combine_chunks())
        columns["hour_of_day"] = pa.array(hours.hour_of_day, pa.int64())
        columns["weekday"] = pa.array(hours.weekday, pa.int64())
        columns[DAY] = pa.array(hours.day, pa.int32())
        return pa.table(columns)
