"""Atomic outputs: nothing partial is ever visible under a final name.

Files are written to a temporary sibling and renamed; a directory output is built under a temporary
sibling directory and renamed into place when complete (``staged_directory``). When writing fails, the
temporary is removed; should that fail too (a read-only disk), the first error is the one raised.
``file_crc32`` is the checksum that checkpoints and serving artifacts record for their files.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _publish_mode(path: Path, directory: bool) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; published outputs get the usual modes.
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish_mode(Path(temp), directory=False)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed cleanup must not hide the error
            os.unlink(temp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed to ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):  # a failed cleanup must not hide the error
            os.unlink(temp)


@contextlib.contextmanager
def staged_directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``path``; it becomes ``path`` on success.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced only after the new
    one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temp
        _publish_mode(temp, directory=True)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, retired / "old")
            os.replace(temp, path)
            shutil.rmtree(retired)
        else:
            os.replace(temp, path)
    finally:
        if temp.exists():
            with contextlib.suppress(OSError):  # a failed cleanup must not hide the error
                shutil.rmtree(temp)


def naming(error: OSError, path: Path) -> OSError:
    """``error``, or when it names no file (a full disk reported by a write) the same error naming
    ``path``, the output being written."""
    if error.filename is not None or (error.errno is None and type(error) is not OSError):
        return error  # names its file, or is ours (FileExistsError("... exists")) and says what it needs
    if error.errno is None:  # Arrow's I/O errors
        return OSError(f"{' '.join(str(error).split())} (writing {path})")
    return OSError(error.errno, error.strerror or str(error), str(path))


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Overlaps I/O-and-parse work (Arrow and numpy release the GIL) with the consumer's work. An
    exception in the producer is re-raised in the consumer; closing the consumer stops the producer.
    """
    items: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry: Tuple[Any, Optional[BaseException]]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            put((done, error))

    thread = threading.Thread(target=produce, name="recsys-kd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


CHECKSUM_BLOCK_BYTES = 1 << 20


def file_crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes (read in 1 MiB blocks) as 8 hex digits: detects damage, not tampering."""
    value = 0
    buffer = bytearray(CHECKSUM_BLOCK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            value = zlib.crc32(view[:count], value)
    return f"{value:08x}"
