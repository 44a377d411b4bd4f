"""Part integrity: a checksum of every Parquet part, recorded when it is written and verified when it is read.

Parquet's own page checksums are optional and off by default, so a flipped byte in a part usually reads
back as a different value, with no error. Every part this project writes therefore gets a whole-file
checksum, ``"crc32:<8 hex digits>"`` (zlib's CRC-32, streamed in 1 MiB blocks), recorded in its manifest:

- a prepared dataset's parts: ``schema.json``, ``splits.<split>.checksums`` (relative file -> checksum),
  written by :class:`~recsys_kd.data.writer.SplitWriter`;
- ``infer`` and ``score`` output parts: the part's sidecar ``<part>.json``, key ``checksum``, written by
  :class:`~recsys_kd.data.parts.PartWriter`.

Readers call :func:`verify_file` before opening a part. A file is read in full once per process: the
result is cached under the file's identity (device, inode, size, mtime and ctime in ns), and a file whose
identity changed is read again. A mismatch raises :class:`ChecksumError` (a ``SchemaError``, one line:
the file, the expected and actual checksums, and how to recover). A manifest written before checksums
existed cannot be verified: :func:`warn_unverifiable` says so once per manifest and process (an
:class:`IntegrityWarning` on one line), and reading goes on.

Example::

    checksum = file_checksum(path)                       # "crc32:1a2b3c4d"
    verify_file(path, checksum, "re-run prepare")        # reads the file once per process
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Set, Tuple, Union

from recsys_kd.data.schema import SchemaError, SplitInfo
from recsys_kd.io import file_crc32
from recsys_kd.runs import SCHEMA_FILE

ALGORITHM = "crc32"
RERUN_PREPARE = "re-run prepare to rebuild the dataset (recsys-kd prepare ... prepare.overwrite=true)"
RERUN_INFER = "re-run infer: it redoes damaged parts"

# resolved path -> (file identity, its actual checksum) of the files verified in this process
_verified: Dict[str, Tuple[Tuple[int, ...], str]] = {}
_warned: Set[str] = set()


class ChecksumError(SchemaError):
    """A part's bytes differ from the checksum recorded when it was written."""


class IntegrityWarning(UserWarning):
    """A manifest records no checksum for its parts (written before checksums existed), or a damaged
    part is redone."""


def file_checksum(path: Union[str, Path]) -> str:
    """``"crc32:<hex>"`` of the file's bytes (:func:`recsys_kd.io.file_crc32`, the checksum checkpoints
    and artifacts record too)."""
    return f"{ALGORITHM}:{file_crc32(path)}"


def _identity(path: Path) -> Tuple[int, ...]:
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def verify_file(path: Union[str, Path], expected: str, recover: str) -> None:
    """Raises :class:`ChecksumError` unless ``path``'s bytes have checksum ``expected``.

    Reads the file only when this process has not checksummed it yet, or it changed since (identity:
    device, inode, size, mtime, ctime). ``recover`` ends the message: what the user should do.
    """
    path = Path(path)
    key = str(path.resolve())
    try:
        identity = _identity(path)
    except FileNotFoundError:
        raise SchemaError(f"{path}: not found, though its manifest lists it; {recover}") from None
    cached = _verified.get(key)
    if cached is not None and cached[0] == identity:
        actual = cached[1]
    else:
        actual = file_checksum(path)
        _verified[key] = (identity, actual)
    if actual != expected:
        raise ChecksumError(f"{path}: damaged: expected checksum {expected} (recorded when it was written), "
                            f"actual {actual}; {recover}")


def warn(message: str) -> None:
    """An :class:`IntegrityWarning`, once per process and message, on one line:
    ``recsys-kd:0: IntegrityWarning: <message>`` (no source line is shown)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn_explicit(message, IntegrityWarning, "recsys-kd", 0)


def warn_unverifiable(manifest: Union[str, Path], what: str, stage: str) -> None:
    """Warns, once per process, that ``manifest`` records no checksum for ``what``: they cannot be verified."""
    warn(f"{manifest} records no checksum for {what} (written by an older version): they cannot be verified; "
         f"re-run {stage} to record them")


def verify_dataset_part(dataset: Union[str, Path], split: str, info: SplitInfo, relative: str) -> None:
    """Checks the prepared dataset's part ``relative`` (of ``split``, described by ``info``) against the
    checksum in ``schema.json``; warns when the schema records none."""
    expected = info.checksums.get(relative)
    if expected is None:
        warn_unverifiable(Path(dataset) / SCHEMA_FILE, f"the parts of split {split!r}", "prepare")
    else:
        verify_file(Path(dataset) / relative, expected, RERUN_PREPARE)


def forget(path: Optional[Union[str, Path]] = None) -> None:
    """Drops the cached verification of ``path`` (of every file when None), so the next check rereads it."""
    if path is None:
        _verified.clear()
        _warned.clear()
    else:
        _verified.pop(str(Path(path).resolve()), None)
