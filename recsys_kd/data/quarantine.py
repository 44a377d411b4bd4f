"""Rows a converter refuses: counted per reason and kept, with file and line, in ``quarantine.jsonl``.

Nothing is silently dropped: every refused row lands here, and ``check`` fails the run when the
share of bad rows passes the configured threshold.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional


# Characters JSON leaves raw in strings that str.splitlines() (and so many line readers) breaks lines at
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class TooManyBadRows(ValueError):
    """The share of quarantined rows passed ``max_bad_fraction``."""


def too_many_bad_rows(
    counts: Mapping[str, int], rows_seen: int, max_bad_fraction: Optional[float], where: Path
) -> Optional[TooManyBadRows]:
    """The error to raise when the refused rows (``counts`` per reason) are more than
    ``max_bad_fraction`` of ``rows_seen`` (None: never), naming ``where`` they are kept; else None."""
    total = sum(counts.values())
    if max_bad_fraction is None or rows_seen == 0 or total / rows_seen <= max_bad_fraction:
        return None
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
    return TooManyBadRows(
        f"{total} of {rows_seen} rows ({total / rows_seen:.2%}) were refused, more than "
        f"max_bad_fraction={max_bad_fraction:g} ({reasons}); see {where}"
    )


class Quarantine:
    """Collects refused rows; written as JSON lines {file, line (1-based), reason, text}.

    Example::

        quarantine = Quarantine(out_dir / "quarantine.jsonl")
        quarantine.add("day_0", 17, "bad_hex", raw_line)
        quarantine.close()
        quarantine.counts   # {"bad_hex": 1}
    """

    max_text_chars = 2000

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")
        self.counts: Dict[str, int] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, file: str, line: int, reason: str, text: str) -> None:
        record = {"file": file, "line": int(line), "reason": reason, "text": text[: self.max_text_chars]}
        self._handle.write(json.dumps(record, ensure_ascii=False).translate(LINE_BREAKS) + "\n")
        self.counts[reason] += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def check(self, rows_seen: int, max_bad_fraction: Optional[float], keep_at: Optional[Path] = None) -> None:
        """Raises TooManyBadRows when bad / seen exceeds ``max_bad_fraction`` (None: never). With
        ``keep_at``, the file is first moved there (out of a staging directory about to be removed),
        and the error names it there."""
        error = too_many_bad_rows(self.counts, rows_seen, max_bad_fraction, keep_at or self.path)
        if error is None:
            return
        if keep_at is not None:
            self.close()
            os.replace(self.path, keep_at)
            self.path = Path(keep_at)
        raise error

    def summary(self) -> Dict[str, int]:
        return dict(sorted(self.counts.items()))
