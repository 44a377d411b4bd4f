"""Criteo click logs: the Kaggle Display Advertising Challenge ``train.txt`` and the Criteo 1TB
``day_N`` files (plain or .gz). Format (both): tab-separated, no header, 40 fields:
label (0/1), I1..I13 integers, C1..C26 categorical values hashed to 32 bits as hex; any field but
the label may be empty (missing).

Integer features become either dense floats, log(1 + max(v, 0)), or categories by the
KD-DAGFM rule v > 2 -> ceil(log(v)^2 + 1) (then treated like the C fields).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from recsys_kd.data import fields
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import RawBlock, read_delimited, section_blocks
from recsys_kd.data.sections import DealtFiles
from recsys_kd.data.source import DAY, LABEL, Section, SourceChunk, SourceInfo

INTEGER_FEATURES = [f"I{i}" for i in range(1, 14)]
CATEGORICAL_FEATURES = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *INTEGER_FEATURES, *CATEGORICAL_FEATURES]
DAY_FILE = re.compile(r"day_(\d+)")


@dataclass
class CriteoOptions:
    """``integers``: ``log`` (dense floats) or ``bucketize`` (categories, as KD-DAGFM)."""

    integers: Literal["log", "bucketize"] = "log"


class CriteoSource(DealtFiles):
    """Streams validated Criteo rows from one or more files, in the order given.

    Example::

        source = CriteoSource(["train.txt"], CriteoOptions(integers="bucketize"))
        for chunk in source.chunks(quarantine):
            chunk.table   # row_id, label, I1..I13 (int64 buckets), C1..C26 (string)
    """

    def __init__(self, files: List[Path], options: CriteoOptions, block_bytes: int = 16 << 20) -> None:
        self.files = [Path(f) for f in files]
        self.options = options
        self.block_bytes = block_bytes
        bucketize = options.integers == "bucketize"
        self.info = SourceInfo(
            name="criteo",
            dense=[] if bucketize else list(INTEGER_FEATURES),
            sparse=(INTEGER_FEATURES if bucketize else []) + CATEGORICAL_FEATURES,
            inputs=[str(f) for f in self.files],
            dense_transform="none" if bucketize else "log1p(max(v, 0))",
        )
        self.dropped_by_rule: Dict[str, int] = {}

    def progress_total(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        def read(path: Path, section: Optional[Section]) -> Iterator[RawBlock]:
            return read_delimited(path, COLUMNS, "\t", quarantine, block_bytes=self.block_bytes, section=section)

        for block, row_base in section_blocks(self.files, sections, read):
            day_match = DAY_FILE.search(Path(block.file).name)
            table, lines = self._validated(block, quarantine)
            out = self._convert(table, row_base + lines)
            if day_match:
                out = out.append_column(DAY, pa.array(np.full(out.num_rows, int(day_match.group(1)), np.int32)))
            yield SourceChunk(out, block.size)

    def _validated(self, block: RawBlock, quarantine: Optional[Quarantine]) -> Tuple[pa.Table, np.ndarray]:
        """The block's rows that pass every field check, and their line numbers."""
        table = block.table
        patterns = [(LABEL, "bad_label", r"^[01]$", False)]
        patterns += [(name, f"bad_integer:{name}", fields.INTEGER, True) for name in INTEGER_FEATURES]
        patterns += [(name, f"bad_hex:{name}", fields.HEX, True) for name in CATEGORICAL_FEATURES]
        checks = fields.check_columns(table, patterns)
        bad, reasons = fields.first_reason(checks, table.num_rows)
        if not bad.any():
            return table, block.lines
        fields.quarantine_rows(quarantine, block.file, table, block.lines, bad, reasons, "\t")
        return table.filter(pa.array(~bad)), block.lines[~bad]

    def _convert(self, table: pa.Table, row_ids: np.ndarray) -> pa.Table:
        columns = {
            "row_id": pa.array(row_ids, pa.int64()),
            LABEL: fields.to_int64(table.column(LABEL).combine_chunks()).cast(pa.float32()),
        }
        for name in INTEGER_FEATURES:
            values = fields.to_int64(table.column(name).combine_chunks())
            if self.options.integers == "bucketize":
                columns[name] = fields.bucketize_log_squared(values)
            else:
                columns[name] = pa.array(fields.log_transform(values.to_numpy(zero_copy_only=False)))
        for name in CATEGORICAL_FEATURES:
            columns[name] = fields.to_token(table.column(name).combine_chunks())
        return pa.table(columns)
