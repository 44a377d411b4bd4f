"""Streaming reader of delimited text logs (TSV/CSV, quoted fields optional) with exact line numbers.

The file is read in blocks of whole lines; lines are split and counted with numpy, so every row
keeps its physical line number, lines with the wrong number of columns go to the quarantine, and
the well-formed lines are parsed by Arrow's C++ CSV parser into binary columns (no UTF-8 decode, so
non-UTF-8 bytes cannot crash the parse; converters validate values themselves). A line longer than
``MAX_LINE_BYTES`` (a runaway field: no click-log field comes close) is quarantined as
``field_too_long`` without being parsed, since Arrow's parser refuses rows longer than its block; one
longer than the buffer is skipped as it streams past, so memory stays bounded by the block size.
``.gz``/``.bz2`` inputs are decompressed on the fly; a truncated or unreadable input is a
:class:`~recsys_kd.data.source.InputError` naming the file. A plain file can be read from a byte range
that starts at a line start (a :class:`~recsys_kd.data.source.Section` dealt to one rank), its lines
numbered from the section's first line; :func:`count_lines` counts a range's lines by the same rule
(a line ends at ``\n``; a last line without one counts too) at memory speed.

With a ``quote_char`` (``format: table``'s CSV/TSV), fields may be quoted as RFC 4180 has it: a field
enclosed in quotes may hold the separator and doubled quotes (``""`` is one ``"``), and the quotes are
not part of the value. A record is still one line (a quoted line break cannot be found without reading
the input from its start, while ranks read byte ranges cut at line starts): a line that ends inside a
quoted field is quarantined as ``unterminated_quote``, as its continuation line is, having a quote in
the middle of a field or an odd number of quotes. A quote anywhere but at a field's start or end
(``a"b``, ``"ab"c``) is ``bad_quote``. A block without a quote is read as without quoting; in one
with quotes, the lines holding one are checked with numpy in one pass over their quotes, separators and
line breaks, and the block is parsed by Arrow with quoting on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.source import InputError, Section

NEWLINE = 10
CARRIAGE_RETURN = 13
# The longest line parsed; must stay below Arrow's CSV block (ARROW_BLOCK_BYTES), as a row longer than
# the block makes the parser fail ("straddling object straddles two block boundaries").
MAX_LINE_BYTES = 512 << 10
ARROW_BLOCK_BYTES = 1 << 20
FIELD_TOO_LONG = "field_too_long"
STRAY_RETURN = "stray_carriage_return"
BAD_QUOTE = "bad_quote"
UNTERMINATED_QUOTE = "unterminated_quote"


class MalformedLine(ValueError):
    """A line :func:`split_line` cannot split; the message is the quarantine reason."""


@dataclass
class RawBlock:
    """Well-formed rows of one block: ``table`` has one binary column per field (possibly no rows);
    ``lines`` holds each row's 0-based physical line number in ``file``; ``line_end`` is the number
    of lines read so far; ``size`` the block's bytes in the (decompressed) input."""

    file: str
    table: pa.Table
    lines: np.ndarray
    line_end: int
    size: int


def read_delimited(
    path: Path,
    column_names: List[str],
    delimiter: str,
    quarantine: Optional[Quarantine],
    skip_header: bool = False,
    block_bytes: int = 16 << 20,
    encoding: str = "utf-8",
    section: Optional[Section] = None,
    quote_char: Optional[str] = None,
) -> Iterator[RawBlock]:
    """Yields blocks of well-formed rows of ``path``; malformed lines are reported to ``quarantine``
    (reason ``wrong_column_count`` ...) when it is given, and skipped either way.

    ``encoding`` other than UTF-8 (e.g. ISO-8859-1 for GroupLens MovieLens) is transcoded to UTF-8
    before parsing. ``section``: only its bytes (a plain file's; a compressed file is read whole), lines
    numbered from its ``first_line``; ``skip_header`` then applies only to a section starting the file.
    ``quote_char``: fields may be quoted with it (module docstring); None: no quoting.
    """
    separator = ord(delimiter)
    quote = None if quote_char is None else ord(quote_char)
    name = str(path)
    transcode = encoding.lower().replace("-", "") not in ("utf8", "ascii")
    line_base = section.first_line if section is not None else 0
    skip_header = skip_header and (section is None or section.start == 0)
    # One reusable buffer: allocating a fresh block-sized bytes object per block fragments the C
    # heap until peak memory creeps up with the input size.
    buffer = np.empty(block_bytes, dtype=np.uint8)
    filled = 0
    first = True
    with _opened(path, section) as stream:
        while True:
            if filled == len(buffer):  # a single line longer than the buffer
                if filled > MAX_LINE_BYTES:
                    text = buffer_text(buffer[: Quarantine.max_text_chars], encoding)
                    skipped, filled = _skip_line(stream, buffer)
                    if quarantine is not None and not (skip_header and first):
                        quarantine.add(name, line_base + 1, FIELD_TOO_LONG, text)
                    line_base += 1
                    first = False
                    yield RawBlock(file=name, table=_empty(column_names), lines=np.zeros(0, np.int64),
                                   line_end=line_base, size=skipped)
                    continue
                buffer = np.concatenate([buffer, np.empty(len(buffer), np.uint8)])
            read = stream.readinto(memoryview(buffer)[filled:])
            filled += read
            at_end = read == 0
            if filled == 0:
                break
            newline_positions = np.flatnonzero(buffer[:filled] == NEWLINE)
            if not at_end and len(newline_positions) == 0:
                continue
            end = filled if at_end else int(newline_positions[-1]) + 1
            block = buffer[:end]
            if transcode:
                block = np.frombuffer(block.tobytes().decode(encoding).encode("utf-8"), dtype=np.uint8)
            table, lines, line_count = _split_block(
                block, separator, column_names, name, line_base, quarantine, skip_header and first, quote
            )
            line_base += line_count
            first = False
            yield RawBlock(file=name, table=table, lines=lines, line_end=line_base, size=end)
            carry = filled - end
            buffer[:carry] = buffer[end:filled]
            filled = carry
            if at_end:
                break


# A text line of the line-based formats (JSON lines, libSVM) never holds this control character, so
# splitting at it reads each line as one field; a line that holds it is quarantined (column count).
WHOLE_LINE = "\x01"
LINE = "line"


def read_lines(
    path: Path, quarantine: Optional[Quarantine], block_bytes: int = 16 << 20, section: Optional[Section] = None
) -> Iterator[RawBlock]:
    """:func:`read_delimited` for line-based formats: each block's ``table`` has one binary column,
    ``line``, the whole line (without its line ending)."""
    return read_delimited(path, [LINE], WHOLE_LINE, quarantine, block_bytes=block_bytes, section=section)


class _Stream:
    """An Arrow input stream whose read errors (a truncated .gz, an I/O error) are InputErrors naming
    the file; with ``limit``, it ends after that many bytes."""

    def __init__(self, stream, name: str, limit: Optional[int] = None) -> None:
        self.stream, self.name, self.remaining = stream, name, limit

    def readinto(self, view: memoryview) -> int:
        if self.remaining is not None:
            view = view[: self.remaining]
            if not len(view):
                return 0
        try:
            read = self.stream.readinto(view)
        except (OSError, EOFError, pa.ArrowInvalid) as error:
            raise InputError(f"{self.name}: cannot read on (truncated or corrupt?): {one_line(error)}") from error
        if self.remaining is not None:
            self.remaining -= read
        return read


def is_compressed(path: Path) -> bool:
    """Whether ``path`` is read through a decompressor (by its extension, as Arrow detects it): such a
    file cannot be entered in the middle, so it is dealt whole."""
    try:
        return pa.Codec.detect(str(path)) is not None
    except (ValueError, TypeError):  # no codec for this extension
        return False


@contextlib.contextmanager
def _opened(path: Path, section: Optional[Section] = None) -> Iterator[_Stream]:
    ranged = section is not None and not is_compressed(path)
    try:
        stream = pa.input_stream(str(path), compression=None if ranged else "detect")
        if ranged:
            stream.seek(section.start)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowInvalid) as error:
        raise InputError(f"{path}: cannot open: {one_line(error)}") from error
    with stream:
        yield _Stream(stream, str(path), section.size if ranged else None)


def count_lines(path: Path, section: Optional[Section] = None, block_bytes: int = 16 << 20) -> int:
    """The lines :func:`read_delimited` numbers in ``path`` (or in ``section`` of it): its newlines,
    plus a last line without one."""
    buffer = bytearray(block_bytes)
    lines, last = 0, NEWLINE
    with _opened(path, section) as stream:
        while True:
            read = stream.readinto(memoryview(buffer))
            if read == 0:
                break
            lines += buffer.count(b"\n", 0, read)
            last = buffer[read - 1]
    return lines + (last != NEWLINE)


def line_start(path: Path, offset: int) -> int:
    """The first line start at or after byte ``offset`` of plain file ``path`` (its size when none)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as handle:
        handle.seek(offset - 1)
        position = offset - 1
        while True:
            block = handle.read(1 << 16)
            if not block:
                return position
            found = block.find(b"\n")
            if found >= 0:
                return position + found + 1
            position += len(block)


def section_blocks(
    files: Sequence[Path],
    sections: Optional[Sequence[Section]],
    read: Callable[[Path, Optional[Section]], Iterator[RawBlock]],
) -> Iterator[Tuple[RawBlock, int]]:
    """``read``'s blocks of every file in order (``sections`` None), or of the given sections, each
    with the row_id of its file's line 0: a row's row_id is that plus its line number."""
    if sections is not None:
        for section in sections:
            for block in read(Path(files[section.file]), section):
                yield block, section.first_row - section.first_line
        return
    row_base = 0
    for path in files:
        line_end = 0
        for block in read(Path(path), None):
            yield block, row_base
            line_end = block.line_end
        row_base += line_end


def _skip_line(stream, buffer: np.ndarray) -> Tuple[int, int]:
    """Reads past the rest of the line that fills ``buffer``; returns (the line's bytes, how many bytes
    of the following lines are now at the start of ``buffer``)."""
    skipped = len(buffer)
    while True:
        read = stream.readinto(memoryview(buffer))
        if read == 0:
            return skipped, 0
        newlines = np.flatnonzero(buffer[:read] == NEWLINE)
        if len(newlines):
            end = int(newlines[0]) + 1
            buffer[: read - end] = buffer[end:read]
            return skipped + end, read - end
        skipped += read


def split_line(line: bytes, delimiter: str, quote_char: Optional[str] = None) -> List[bytes]:
    """One line's fields (without its line ending) by :func:`read_delimited`'s rules, quotes removed
    (a header line); :class:`MalformedLine` (``bad_quote``, ``unterminated_quote``) when it is malformed."""
    if quote_char is None or quote_char.encode() not in line:
        return line.split(delimiter.encode())
    buffer = np.frombuffer(line, dtype=np.uint8)
    separator, quote = ord(delimiter), ord(quote_char)
    bad_quote, unterminated, fields = _check_quotes(buffer, separator, quote, 1)
    if bad_quote[0] or unterminated[0]:
        raise MalformedLine(BAD_QUOTE if bad_quote[0] else UNTERMINATED_QUOTE)
    names = [f"f{index}" for index in range(int(fields[0]))]
    table, _, _ = _split_block(buffer, separator, names, "", 0, None, False, quote)
    return [table.column(name)[0].as_py() for name in names]


def join_fields(values: Sequence[bytes], delimiter: str, quote_char: Optional[str] = None) -> bytes:
    """The line :func:`split_line` splits into ``values``: a value holding the separator, the quote
    or a line break is quoted, its quotes doubled."""
    if quote_char is None:
        return delimiter.encode().join(values)
    quote = quote_char.encode()
    special = (delimiter.encode(), quote, b"\n", b"\r")
    return delimiter.encode().join(
        quote + value.replace(quote, quote + quote) + quote if any(s in value for s in special) else value
        for value in values)


def buffer_text(data: np.ndarray, encoding: str = "utf-8") -> str:
    """Raw bytes as quarantine text (undecodable bytes replaced)."""
    return data.tobytes().rstrip(b"\r\n").decode(encoding, "replace")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (Arrow's and torch's messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _empty(column_names: List[str]) -> pa.Table:
    return pa.table({column: pa.array([], pa.binary()) for column in column_names})


def _split_block(
    buffer: np.ndarray,
    separator: int,
    column_names: List[str],
    file: str,
    line_base: int,
    quarantine: Optional[Quarantine],
    skip_first_line: bool,
    quote: Optional[int] = None,
):
    expected = len(column_names)
    newlines = np.flatnonzero(buffer == NEWLINE)
    if len(newlines) == 0 or newlines[-1] != len(buffer) - 1:
        newlines = np.append(newlines, len(buffer))
    line_count = len(newlines)
    starts = np.concatenate([[0], newlines[:-1] + 1])
    # Separators before each line end minus those before its start (sorted positions, so a binary
    # search per line instead of a pass over every byte).
    separator_positions = np.flatnonzero(buffer == separator)
    fields = np.searchsorted(separator_positions, newlines) - np.searchsorted(separator_positions, starts) + 1
    quoted_block = quote is not None and bool(np.any(buffer == quote))
    bad_quote = unterminated = np.zeros(line_count, dtype=bool)
    if quoted_block:
        bad_quote, unterminated, quoted_lines, quoted_fields = _quoted_lines(buffer, separator, quote, newlines, starts)
        fields[quoted_lines] = quoted_fields
    too_long = newlines - starts > MAX_LINE_BYTES
    # Arrow's parser ends a row at a bare '\r' too; only "\r\n" (or a final '\r') is a line ending here.
    returns = np.flatnonzero(buffer == CARRIAGE_RETURN)
    stray = returns[(returns + 1 < len(buffer)) & (buffer[np.minimum(returns + 1, len(buffer) - 1)] != NEWLINE)]
    stray_lines = np.zeros(line_count, dtype=bool)
    stray_lines[np.searchsorted(newlines, stray)] = True
    good = (fields == expected) & ~too_long & ~stray_lines & ~bad_quote & ~unterminated
    if skip_first_line:
        good[0] = False
    numbers = np.arange(line_count, dtype=np.int64) + line_base
    bad = np.flatnonzero(~good)
    if skip_first_line:
        bad = bad[1:]
    if quarantine is not None:
        for index in bad:
            end = min(int(newlines[index]), int(starts[index]) + Quarantine.max_text_chars)
            reason = (FIELD_TOO_LONG if too_long[index] else STRAY_RETURN if stray_lines[index]
                      else BAD_QUOTE if bad_quote[index] else UNTERMINATED_QUOTE if unterminated[index]
                      else "wrong_column_count")
            quarantine.add(file, int(numbers[index]) + 1, reason, buffer_text(buffer[starts[index] : end]))
    if not good.any():
        return _empty(column_names), numbers[good], line_count
    if good.all():
        body = buffer
    else:
        lengths = np.minimum(newlines + 1, len(buffer)) - starts
        body = buffer[np.repeat(good, lengths)]
    quoting = chr(quote) if quoted_block else False  # a block without quotes parses as before
    table = pacsv.read_csv(
        pa.BufferReader(pa.py_buffer(body)),
        read_options=pacsv.ReadOptions(column_names=column_names, use_threads=True, block_size=ARROW_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=chr(separator), quote_char=quoting, double_quote=True,
                                         ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in column_names}, strings_can_be_null=False
        ),
    )
    last = table.column(expected - 1).combine_chunks()
    if pc.any(pc.ends_with(last, b"\r")).as_py():
        # Windows line endings: drop the trailing carriage return of the last field.
        trimmed = pc.binary_replace_slice(last, start=-1, stop=2**31 - 1, replacement=b"")
        last = pc.if_else(pc.ends_with(last, b"\r"), trimmed, last)
        table = table.set_column(expected - 1, column_names[-1], last)
    return table, numbers[good], line_count


def _quoted_lines(
    buffer: np.ndarray, separator: int, quote: int, line_ends: np.ndarray, starts: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_check_quotes` of the lines of a block that hold a quote (copied out when not all do, so
    a block quoted here and there pays for those lines only): (per line: a quote out of place, an
    unterminated quote; the lines holding a quote and their fields)."""
    quotes_before_end = np.searchsorted(np.flatnonzero(buffer == quote), line_ends)
    holds_quote = np.diff(quotes_before_end, prepend=0) > 0
    lines = np.flatnonzero(holds_quote)
    if len(lines) < len(line_ends):
        lengths = np.minimum(line_ends + 1, len(buffer)) - starts
        buffer = buffer[np.repeat(holds_quote, lengths)]
    misplaced, open_at_end, fields = _check_quotes(buffer, separator, quote, len(lines))
    bad_quote = np.zeros(len(line_ends), dtype=bool)
    unterminated = np.zeros(len(line_ends), dtype=bool)
    bad_quote[lines], unterminated[lines] = misplaced, open_at_end
    return bad_quote, unterminated, lines, fields


def _check_quotes(
    buffer: np.ndarray, separator: int, quote: int, line_count: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RFC 4180 quoting of every line of a block of ``line_count`` lines: per line, (a quote out of
    place, the line ends inside a quoted field, its fields: separators outside quotes + 1).

    Numbered within its line, an even quote opens a quoted field and must start a field (line start or
    after a separator), or be the second of a doubled quote; an odd one closes it and must end the field
    (a separator or the line end follows), or be the first of a doubled quote. A line whose quotes all
    pass is well quoted when their number is even, and a separator lies inside quotes when an odd
    number of its line's quotes come before it. One pass over the block's quotes, separators and line
    breaks in order (running counts, no search)."""
    events = np.flatnonzero((buffer == quote) | (buffer == separator) | (buffer == NEWLINE))
    kind = buffer[events]
    is_quote, is_newline = kind == quote, kind == NEWLINE
    quotes_so_far = np.cumsum(is_quote)
    # quotes before each event in its line: those before it minus those before its line's start
    line_base = np.maximum.accumulate(np.where(is_newline, quotes_so_far, 0))
    ordinal = quotes_so_far - is_quote - line_base
    line = np.cumsum(is_newline) - is_newline
    quotes, quote_ordinal, line_of_quote = events[is_quote], ordinal[is_quote], line[is_quote]
    doubled = quotes[1:] == quotes[:-1] + 1  # quote i and quote i + 1 are adjacent (in one line)
    before = buffer[np.maximum(quotes - 1, 0)]
    after = buffer[np.minimum(quotes + 1, len(buffer) - 1)]
    opens_field = (quotes == 0) | (before == NEWLINE) | (before == separator) | np.append(False, doubled)
    ends_field = ((quotes + 1 == len(buffer)) | (after == separator) | (after == NEWLINE)
                  | (after == CARRIAGE_RETURN) | np.append(doubled, False))
    misplaced = np.where(quote_ordinal % 2 == 0, ~opens_field, ~ends_field)
    bad_quote = np.zeros(line_count, dtype=bool)
    bad_quote[line_of_quote[misplaced]] = True
    unterminated = (np.bincount(line_of_quote, minlength=line_count) % 2 == 1) & ~bad_quote
    is_separator = kind == separator
    unquoted = line[is_separator][ordinal[is_separator] % 2 == 0]
    return bad_quote, unterminated, np.bincount(unquoted, minlength=line_count) + 1
