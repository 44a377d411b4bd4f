"""Reading a DCP checkpoint without running code from it.

torch.distributed.checkpoint reads a checkpoint's ``.metadata`` with plain ``pickle`` and, for a value
its metadata calls bytes, calls ``torch.load(weights_only=False)``: a file planted in a run directory
would run on resume, ``init_from``, export, infer or compress. Here the metadata goes through an
unpickler that resolves only the types DCP metadata holds (:func:`_metadata_globals`), its storage
entries must name files inside the checkpoint, and non-tensor values are unpickled weights-only.
Every load of the project goes through :func:`dcp_load`.
"""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or unsafe to read."""


def _metadata_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object: every global a DCP ``.metadata`` pickle of this project refers to
    (recorded from checkpoints of 1 and 2 ranks, every sharding type, with optimizer state), plus
    ``BytesStorageMetadata`` (a non-tensor value) and every torch dtype. Nothing else is resolved."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: Dict[Tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
        for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by name
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :func:`_metadata_globals`; any other global is a :class:`CheckpointError`."""

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle)
        self.path = path
        self.allowed = _metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise CheckpointError(f"{self.path}: refused to unpickle the global {module}.{name}: not a type DCP "
                                  "metadata holds (was the checkpoint tampered with?)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.path}: refused a persistent id in DCP metadata")


def read_metadata(path: Path, rank: Optional[int] = None) -> Metadata:
    """A checkpoint's DCP metadata (``.metadata``, or ``__<rank>.metadata``) through the restricted
    unpickler; its storage entries must name files inside the checkpoint."""
    file = Path(path) / (METADATA if rank is None else f"__{rank}{METADATA}")
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle, file).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found; is {path} a checkpoint?") from None
    except Exception as error:  # a damaged pickle fails in many ways
        raise CheckpointError(f"{file}: not readable DCP metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not DCP metadata (a {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(f"{file}: a storage entry names {relative!r}, not a file of the checkpoint")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file system reader with :func:`read_metadata` (the restricted unpickler) for its metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path), kwargs.get("rank"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that a non-tensor value is unpickled weights-only (the default
    planner calls ``torch.load(weights_only=False)`` on whatever the metadata says is bytes)."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            first = next((line for line in str(error).splitlines() if "Unsupported" in line or "global" in line), "")
            raise CheckpointError(f"refused to unpickle the stored value of {fqn}: {first or 'not weights-only'}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def dcp_load(state: Dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """``dcp.load`` with the safe reader and planner; the metadata is read (and refused) before DCP
    starts, and a refusal inside DCP comes out as the :class:`CheckpointError` it is."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as error:
        failures = [failure for failure, _ in error.failures.values()]
        for failure in failures:
            if isinstance(failure, CheckpointError):
                raise CheckpointError(f"{path}: {failure}") from None
        first = " ".join(str(failures[0]).split())[:300] if failures else "unknown failure"
        raise CheckpointError(f"{path}: cannot be read (truncated or damaged?): {type(failures[0]).__name__ if failures else ''}"
                              f" {first}") from None
