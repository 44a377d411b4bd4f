"""Pure, vectorized checks and transforms of raw log fields (Arrow binary columns in, arrays out).

Each ``check_*`` returns a boolean numpy mask of rows whose value is *invalid*; an empty value
(missing) is valid wherever the format allows it. Transforms state their formula.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_kd.data.quarantine import Quarantine

INTEGER = r"^-?[0-9]{1,18}$"  # fits int64 without overflow
HEX = r"^[0-9a-fA-F]{1,16}$"
TOKEN = r"^[\x21-\x7e]+$"  # printable ASCII without spaces or separators
NUMBER = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"  # decimal, as Arrow parses it (no nan/inf)


def invalid_mask(column: pa.Array, pattern: str, allow_empty: bool) -> np.ndarray:
    """Rows whose value does not match ``pattern`` (anchored RE2); empty values pass if allowed."""
    matches = pc.match_substring_regex(column, pattern)
    if allow_empty:
        matches = pc.or_(matches, pc.equal(pc.binary_length(column), 0))
    return ~np.asarray(matches.to_numpy(zero_copy_only=False), dtype=bool)


def check_columns(table: pa.Table, patterns: List[Tuple[str, str, str, bool]]) -> List[Tuple[str, np.ndarray]]:
    """Runs ``invalid_mask`` for each (column, reason, pattern, allow_empty) on a thread pool (Arrow
    releases the GIL), returning (reason, mask) pairs in the given order."""
    def check(spec: Tuple[str, str, str, bool]) -> Tuple[str, np.ndarray]:
        column, reason, pattern, allow_empty = spec
        return reason, invalid_mask(table.column(column), pattern, allow_empty)

    return list(thread_pool().map(check, patterns))


@functools.lru_cache(maxsize=1)
def thread_pool() -> ThreadPoolExecutor:
    """A process-wide pool for column-parallel Arrow/numpy work."""
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="recsys-kd-check")


def utf8_invalid_mask(column: pa.Array) -> np.ndarray:
    """Rows whose bytes are not valid UTF-8 (checked only when the whole column fails)."""
    try:
        column.cast(pa.string()).validate(full=True)
        return np.zeros(len(column), dtype=bool)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return np.array([not _is_utf8(value) for value in column.to_pylist()], dtype=bool)


def _is_utf8(value: Optional[bytes]) -> bool:
    if value is None:
        return True
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def to_int64(column: pa.Array) -> pa.Array:
    """Validated integer text -> int64, empty -> null."""
    text = column.cast(pa.string())
    return pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, pa.string()), text).cast(pa.int64())


def to_token(column: pa.Array) -> pa.Array:
    """Validated text -> string, empty -> null (missing)."""
    text = column.cast(pa.string())
    return pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, pa.string()), text)


def log_transform(values: np.ndarray) -> np.ndarray:
    """Dense integer feature -> float32 log(1 + max(v, 0)); missing (NaN) -> 0. As in DLRM's Criteo
    preprocessing: negative counts (a few Criteo columns) are clamped to 0."""
    clean = np.nan_to_num(values.astype(np.float64), nan=0.0)
    return np.log1p(np.maximum(clean, 0.0)).astype(np.float32)


def bucketize_log_squared(values: pa.Array) -> pa.Array:
    """Integer feature -> category id (KD-DAGFM / Criteo-winner rule): v > 2 -> ceil(log(v)^2 + 1),
    v <= 2 kept as is; missing stays null. Returns int64."""
    raw = values.to_numpy(zero_copy_only=False)
    mask = values.is_null().to_numpy(zero_copy_only=False)
    numbers = np.where(mask, 0, raw).astype(np.float64)
    big = numbers > 2
    buckets = numbers.astype(np.int64)
    buckets[big] = np.ceil(np.log(numbers[big]) ** 2 + 1).astype(np.int64)
    return pa.array(buckets, type=pa.int64(), mask=mask)


def bucketize_log_squared_scalar(value: int) -> int:
    """The same rule for one value (a direct form the vectorized version is tested against)."""
    return math.ceil(math.log(value) ** 2 + 1) if value > 2 else value


def first_reason(masks: List[Tuple[str, np.ndarray]], rows: int) -> Tuple[np.ndarray, List[Optional[str]]]:
    """Combines per-check invalid masks: (bad mask, reason of each bad row = its first failed check)."""
    bad = np.zeros(rows, dtype=bool)
    reasons: Dict[int, str] = {}
    for reason, mask in masks:
        fresh = mask & ~bad
        for index in np.flatnonzero(fresh):
            reasons[int(index)] = reason
        bad |= mask
    return bad, [reasons.get(i) for i in range(rows)] if bad.any() else []


def quarantine_rows(
    quarantine: Optional[Quarantine],
    file: str,
    table: pa.Table,
    lines: np.ndarray,
    bad: np.ndarray,
    reasons: List[Optional[str]],
    delimiter: str,
) -> None:
    """Reports the bad rows of a parsed block (text rebuilt from its fields) to the quarantine."""
    if quarantine is None or not bad.any():
        return
    columns = [table.column(i) for i in range(table.num_columns)]
    for index in np.flatnonzero(bad):
        fields = [column[int(index)].as_py() or b"" for column in columns]
        text = delimiter.encode().join(fields).decode("utf-8", "replace")
        quarantine.add(file, int(lines[index]) + 1, reasons[int(index)], text)


def split_tokens(text: pa.Array, separator: str, max_length: Optional[int] = None) -> pa.ListArray:
    """Text -> list<string> of its non-empty tokens between ``separator``s, in order, the first
    ``max_length`` kept (None: all); a null or empty text is an empty list.

    Example: ``split_tokens(pa.array(["a|b||c", None]), "|", max_length=2)`` -> ``[["a", "b"], []]``.
    """
    text = text.cast(pa.string()).fill_null("")
    lists = pc.split_pattern(text, separator)
    offsets = list_offsets(lists)
    flat = pc.list_flatten(lists)
    keep = np.asarray(pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False), dtype=bool)
    return _kept_lists(flat, offsets, keep, max_length)


def truncate_lists(lists: pa.Array, max_length: Optional[int]) -> pa.ListArray:
    """Each list's first ``max_length`` non-null values (None: all); a null list is an empty one."""
    offsets = list_offsets(lists)
    flat = pc.list_flatten(lists)
    keep = ~np.asarray(flat.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return _kept_lists(flat, offsets, keep, max_length)


def list_offsets(lists: pa.Array) -> np.ndarray:
    """A list array's offsets as int64, starting at 0 even for a slice; a null list is empty."""
    offsets = np.asarray(lists.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    lengths = np.diff(offsets)
    if lists.null_count:
        lengths[np.asarray(lists.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = 0
    return np.concatenate([[0], np.cumsum(lengths)])


def _kept_lists(flat: pa.Array, offsets: np.ndarray, keep: np.ndarray, max_length: Optional[int]) -> pa.ListArray:
    rows = len(offsets) - 1
    row_of = np.repeat(np.arange(rows), np.diff(offsets))
    if max_length is not None:
        kept_rows = row_of[keep]
        starts = np.concatenate([[0], np.cumsum(np.bincount(kept_rows, minlength=rows))])[:-1]
        position = np.zeros(len(keep), dtype=np.int64)
        position[keep] = np.arange(len(kept_rows)) - starts[kept_rows]
        keep = keep & (position < max_length)
    counts = np.bincount(row_of[keep], minlength=rows)
    new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = flat.filter(pa.array(keep, pa.bool_()))
    return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), values)
