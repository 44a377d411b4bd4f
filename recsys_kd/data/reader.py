"""Streaming Parquet reader: row groups -> torchrec batches, sharded over ranks and workers, resumable.

How rows are dealt out (every rank computes the same thing, so no communication is needed):

- Work units are the split's (file, row group) pairs in a fixed order: files as listed in
  ``schema.json``, then row-group index. Row counts come from Parquet footers.
- Each epoch, with ``shuffle``, the units are permuted by a generator seeded with (seed, epoch).
  Unit ``i`` goes to consumer ``i % (world_size * num_workers)``, where consumer
  ``rank * num_workers + worker`` is one DataLoader worker of one rank: disjoint and exhaustive.
- A consumer reads its units a window at a time (``shuffle_window_row_groups`` row groups when
  shuffling, one otherwise) and permutes each window's rows with a generator seeded by
  (seed, epoch, rank, worker, window). Memory is bounded by the window, never by the dataset.
- Batches are cut from the consumer's continuous row stream, so a batch may span windows.

A consumer's position is the number of rows of its stream handed out this epoch. Resuming skips
whole windows by their footer row counts and re-reads only the window holding the position, so a
resumed reader yields exactly the batches an uninterrupted one would have yielded next.

Sparse ids are checked against ``num_embeddings`` per row group as it is read (min/max per column;
the offending row is looked up only on failure), so a bad id stops the reader before any batch
holding it reaches an embedding lookup.

Example::

    reader = ParquetReader("data/criteo", "train", ReaderConfig(shuffle=True), num_workers=2)
    loader = ResumableLoader(reader)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
            checkpoint["reader"] = loader.state_dict()
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys_kd.data.schema import ROW_ID, Schema, SchemaError
from recsys_kd.memory import pin_mmap_threshold

# per multi-hot feature, the (values, offsets) arrays of each row group read so far
_ListParts = Tuple[List[np.ndarray], List[np.ndarray]]

# state_dict keys that fix the row stream: resuming under different values would replay other rows.
_STREAM_KEYS = (
    "rank",
    "world_size",
    "num_workers",
    "batch_size",
    "shuffle",
    "shuffle_window_row_groups",
    "seed",
    "drop_last",
    "split_rows",
)


class IdRangeError(SchemaError):
    """A sparse id lies outside [0, num_embeddings); the message names file, feature, value, row_id."""


@dataclass
class ReaderConfig:
    """How a :class:`ParquetReader` batches and orders rows.

    ``shuffle_window_row_groups`` row groups are read together and their rows mixed; larger windows
    shuffle better and cost proportionally more memory. ``extras`` names float32 columns from
    ``schema.extra`` or a side input (e.g. teacher logits) to load into :attr:`Batch.extras`; a side
    input's fixed-size list<float32> columns (e.g. teacher hint vectors) load as [B, H].
    """

    batch_size: int = 4096
    shuffle: bool = False
    shuffle_window_row_groups: int = 8
    seed: int = 0
    drop_last: bool = False
    validate_ids: bool = True
    extras: List[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_window_row_groups < 1:
            raise ValueError(f"shuffle_window_row_groups must be >= 1, got {self.shuffle_window_row_groups}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class Batch(Pipelineable):
    """One batch of B rows (B == batch_size except possibly the last of a worker's epoch).

    Attributes:
        dense: [B, n_dense] float32, columns in ``schema.dense`` order.
        sparse: KeyedJaggedTensor with keys in ``schema.sparse`` order, stride B, values int64 in
            key-major order, lengths [F * B] int32 (all 1 for single-valued features).
        labels: [B] float32.
        extras: name -> the configured extra columns: [B] float32, or [B, H] float32 for a side
            input's vector columns (fixed-size lists, e.g. teacher hint vectors).
        row_ids: [B] int64, the rows' ``row_id`` column.
        worker: the reader worker that produced this batch.
        rows_consumed: that worker's position after this batch (its ``rows_consumed`` entry).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    extras: Dict[str, torch.Tensor]
    row_ids: torch.Tensor
    worker: int = 0
    rows_consumed: int = 0

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return dataclasses.replace(
            self,
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            extras={name: t.to(device=device, non_blocking=non_blocking) for name, t in self.extras.items()},
            row_ids=self.row_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        for tensor in self.extras.values():
            tensor.record_stream(stream)
        self.row_ids.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return dataclasses.replace(
            self,
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            extras={name: t.pin_memory() for name, t in self.extras.items()},
            row_ids=self.row_ids.pin_memory(),
        )


@dataclass
class _Block:
    """N rows as column-major numpy arrays: what a window is read into and batches are cut from.

    Column-major because filling from Arrow columns and slicing batches are then contiguous
    copies; single-valued sparse features share one array so a batch's KJT values are one copy.
    Multi-hot features are (values [nnz], offsets [N + 1]) pairs.
    """

    row_ids: np.ndarray  # [N] int64
    labels: np.ndarray  # [N] float32
    dense: np.ndarray  # [n_dense, N] float32
    ids: np.ndarray  # [n_single, N] int64
    lists: List[Tuple[np.ndarray, np.ndarray]]  # per multi-hot feature: values [nnz], offsets [N + 1] int64
    extras: np.ndarray  # [n_extras, N] float32 (scalar extra columns)
    # per vector extra column: [N, H] float32, row-major so that a row's vector gathers as one copy
    vectors: List[np.ndarray] = field(default_factory=list)

    @staticmethod
    def allocate(rows: int, n_dense: int, n_single: int, n_extras: int, widths: Sequence[int] = ()) -> "_Block":
        """Uninitialized storage for ``rows`` rows (multi-hot lists are not pooled: left empty);
        ``widths``: H of each vector extra column."""
        return _Block(
            row_ids=np.empty(rows, dtype=np.int64),
            labels=np.empty(rows, dtype=np.float32),
            dense=np.empty((n_dense, rows), dtype=np.float32),
            ids=np.empty((n_single, rows), dtype=np.int64),
            lists=[],
            extras=np.empty((n_extras, rows), dtype=np.float32),
            vectors=[np.empty((rows, width), dtype=np.float32) for width in widths],
        )

    def __len__(self) -> int:
        return self.row_ids.shape[0]

    def head(self, rows: int) -> "_Block":
        """Views of the first ``rows`` rows' fixed-width columns; lists left empty."""
        return _Block(
            row_ids=self.row_ids[:rows],
            labels=self.labels[:rows],
            dense=self.dense[:, :rows],
            ids=self.ids[:, :rows],
            lists=[],
            extras=self.extras[:, :rows],
            vectors=[vector[:rows] for vector in self.vectors],
        )

    def take(self, rows: np.ndarray, out: "_Block") -> "_Block":
        """Gathers the rows at positions ``rows`` [len(out)] into ``out`` and returns it."""
        for source, target in ((self.row_ids, out.row_ids), (self.labels, out.labels)):
            _take(source, rows, target)
        for sources, targets in ((self.dense, out.dense), (self.ids, out.ids), (self.extras, out.extras)):
            for source, target in zip(sources, targets):
                _take(source, rows, target)
        for source, target in zip(self.vectors, out.vectors):
            np.take(source, rows, axis=0, out=target, mode="clip")
        out.lists = [_gather_list(values, offsets, rows) for values, offsets in self.lists]
        return out

    def slice(self, start: int, stop: int) -> "_Block":
        """Rows [start, stop), copied: a batch must not be a view of its window, since moving a
        tensor to shared memory (DataLoader workers) moves its whole storage."""
        rows = slice(start, stop)
        return _Block(
            row_ids=self.row_ids[rows].copy(),
            labels=self.labels[rows].copy(),
            dense=self.dense[:, rows].copy(),
            ids=self.ids[:, rows].copy(),
            lists=[_slice_list(values, offsets, start, stop) for values, offsets in self.lists],
            extras=self.extras[:, rows].copy(),
            vectors=[vector[rows].copy() for vector in self.vectors],
        )

    @staticmethod
    def concat(blocks: Sequence["_Block"]) -> "_Block":
        if len(blocks) == 1:
            return blocks[0]
        lists = []
        for feature in range(len(blocks[0].lists)):
            values = [block.lists[feature][0] for block in blocks]
            offsets = [block.lists[feature][1] for block in blocks]
            lists.append(_concat_lists(values, offsets))
        return _Block(
            row_ids=np.concatenate([block.row_ids for block in blocks]),
            labels=np.concatenate([block.labels for block in blocks]),
            dense=np.concatenate([block.dense for block in blocks], axis=1),
            ids=np.concatenate([block.ids for block in blocks], axis=1),
            lists=lists,
            extras=np.concatenate([block.extras for block in blocks], axis=1),
            vectors=[np.concatenate(parts) for parts in zip(*(block.vectors for block in blocks))],
        )


def _take(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    # mode="clip" never clips valid positions; the default "raise" mode buffers ``out`` (a copy)
    np.take(source, rows, out=out, mode="clip")


def _slice_list(
    values: np.ndarray, offsets: np.ndarray, start: int, stop: int
) -> Tuple[np.ndarray, np.ndarray]:
    bounds = offsets[start : stop + 1]
    return values[bounds[0] : bounds[-1]].copy(), bounds - bounds[0]


def _gather_list(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position k of the output reads source starts[r] + (k - new_offsets[r]) for its row r
    source = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1], dtype=np.int64)
    return values[source], new_offsets


def _concat_lists(
    values: Sequence[np.ndarray], offsets: Sequence[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray]:
    shifted = [offsets[0]]
    base = offsets[0][-1]
    for part in offsets[1:]:
        shifted.append(part[1:] + base)
        base += part[-1]
    return np.concatenate(values), np.concatenate(shifted)


@dataclass(frozen=True)
class _Unit:
    """One row group of one file: the unit rows are dealt out in."""

    file: int
    row_group: int
    rows: int


class ParquetReader(IterableDataset):
    """Streams one split of a prepared dataset as :class:`Batch` objects for one rank.

    Iterate it directly when ``num_workers == 1``; with more workers run it through
    :class:`ResumableLoader` (or a ``DataLoader(reader, batch_size=None, num_workers=num_workers)``).

    Each ``iter()`` starts the current epoch from its beginning, except the first after
    :meth:`load_state_dict`, which continues from the loaded position.

    Args:
        dataset_dir: directory with ``schema.json`` and the split's Parquet parts.
        split: split name, e.g. ``"train"``.
        config: batching and ordering.
        rank, world_size: this process's place; default from torch.distributed when initialized,
            else 0 and 1.
        num_workers: data workers per rank reading this split (consumers = world_size * num_workers).
    """

    def __init__(
        self,
        dataset_dir: Union[str, Path],
        split: str,
        config: Optional[ReaderConfig] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        num_workers: int = 1,
        side_inputs: Sequence[Union[str, Path]] = (),
    ) -> None:
        super().__init__()
        pin_mmap_threshold()
        self._buffers: Optional[Tuple[_Block, Optional[_Block]]] = None
        self.config = config or ReaderConfig()
        self.config.validate()
        distributed = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.rank = rank
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        self.world_size = world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers

        self.dataset_dir = Path(dataset_dir)
        self.schema = Schema.load(self.dataset_dir)
        self.split = split
        info = self.schema.split(split)
        self.files = [self.dataset_dir / name for name in info.files]
        self._side, side_widths = _side_columns(side_inputs, self.schema, split, info.files)
        # the wanted vector columns and their widths H, in extras order; the rest are scalars
        self.vector_widths: Dict[str, int] = {
            name: side_widths[name] for name in self.config.extras if name in side_widths
        }
        self._scalars = [name for name in self.config.extras if name not in self.vector_widths]
        unknown = [name for name in self.config.extras if name not in self.schema.extra and name not in self._side]
        if unknown:
            available = [*self.schema.extra, *self._side]
            raise SchemaError(
                f"{self.dataset_dir}: extra column {unknown[0]!r} is neither in the schema's extra nor in a side "
                f"input (available: {available})"
            )
        own_extras = [name for name in self.config.extras if name not in self._side]

        self._single = [f.name for f in self.schema.sparse if not f.multi_hot]
        self._multi = [f.name for f in self.schema.sparse if f.multi_hot]
        self._single_limits = np.array([self.schema.feature(name).num_embeddings for name in self._single])
        self._columns = [ROW_ID, self.schema.label, *self.schema.dense, *self.schema.sparse_names, *own_extras]
        self._units = self._enumerate_units()
        self.split_rows = sum(unit.rows for unit in self._units)
        if self.split_rows != info.rows:
            raise SchemaError(
                f"{self.dataset_dir}: split {split!r} has {self.split_rows} rows in its Parquet footers, "
                f"schema.json says {info.rows}"
            )

        self._epoch = 0
        self._consumed = [0] * num_workers
        self._resume_from: Optional[List[int]] = None

    # ----- position -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next ``iter()`` reads; a loaded position is kept for its own epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._consumed = [0] * self.num_workers
            self._resume_from = None

    def state_dict(self) -> Dict[str, Any]:
        """The position: epoch and rows handed out per worker, plus what fixes the row stream."""
        return {
            "epoch": self._epoch,
            "rows_consumed": list(self._consumed),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.config.batch_size,
            "shuffle": self.config.shuffle,
            "shuffle_window_row_groups": self.config.shuffle_window_row_groups,
            "seed": self.config.seed,
            "drop_last": self.config.drop_last,
            "split_rows": self.split_rows,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues from ``state`` at the next ``iter()``; the stream settings must match."""
        current = self.state_dict()
        for key in _STREAM_KEYS:
            if state.get(key) != current[key]:
                raise ValueError(
                    f"reader state has {key}={state.get(key)!r} but this reader has {current[key]!r}; "
                    "resuming would replay different rows"
                )
        epoch = int(state["epoch"])
        consumed = [int(rows) for rows in state["rows_consumed"]]
        for worker, rows in enumerate(consumed):
            available = self._rows(worker, epoch)
            if not 0 <= rows <= available:
                raise ValueError(
                    f"reader state: worker {worker} consumed {rows} rows of epoch {epoch}, which has {available}"
                )
        self._epoch = epoch
        self._consumed = consumed
        self._resume_from = list(consumed)

    def _begin_pass(self) -> List[int]:
        """Positions the pass now starting begins at (one per worker); consumes a loaded position."""
        start = self._resume_from or [0] * self.num_workers
        self._resume_from = None
        self._consumed = list(start)
        return start

    def _advance(self, batch: Batch) -> None:
        self._consumed[batch.worker] = batch.rows_consumed

    # ----- one file in order (inference) ----------------------------------------------------------

    def file_row_groups(self, file_index: int) -> List[int]:
        """Row counts of the row groups of ``files[file_index]``, in order."""
        return [unit.rows for unit in self._units if unit.file == file_index]

    def file_batches(self, file_index: int) -> Iterator[Tuple[int, Batch]]:
        """(row group, batch) over ``files[file_index]`` in file order, no shuffle, ignoring rank
        assignment; batches of up to ``batch_size`` rows never span row groups."""
        size = self.config.batch_size
        for u, unit in enumerate(self._units):
            if unit.file != file_index:
                continue
            block = self._read([u], self._allocate(unit.rows))
            for start in range(0, unit.rows, size):
                yield unit.row_group, self._to_batch(block.slice(start, min(start + size, unit.rows)), 0, 0)

    # ----- sizes ---------------------------------------------------------------------------------

    def num_rows(self, worker: Optional[int] = None) -> int:
        """Rows this rank (or one of its workers) reads in the current epoch, from footers."""
        workers = range(self.num_workers) if worker is None else [worker]
        return sum(self._rows(w, self._epoch) for w in workers)

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch (over all its workers).

        Varies by rank and, when shuffling, by epoch: row groups differ in size.
        """
        size = self.config.batch_size
        rows = [self.num_rows(worker) for worker in range(self.num_workers)]
        if self.config.drop_last:
            return sum(n // size for n in rows)
        return sum(-(-n // size) for n in rows)

    # ----- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        worker = self._worker_id()
        start = self._begin_pass()[worker]
        position = start
        for block in self._cut(self._windows(worker, start)):
            position += len(block)
            batch = self._to_batch(block, worker, position)
            self._advance(batch)
            yield batch

    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            if self.num_workers != 1:
                raise ValueError(
                    f"reader has num_workers={self.num_workers}: iterate it through ResumableLoader "
                    "or a DataLoader with as many workers"
                )
            return 0
        if info.num_workers != self.num_workers:
            raise ValueError(
                f"reader has num_workers={self.num_workers} but runs in a DataLoader with {info.num_workers} workers"
            )
        return info.id

    def _enumerate_units(self) -> List[_Unit]:
        units = []
        for index, path in enumerate(self.files):
            try:
                parquet = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as error:
                raise SchemaError(f"{path}: cannot read Parquet footer: {error}") from error
            with parquet:
                self._check_columns(path, parquet.schema_arrow)
                metadata = parquet.metadata
                for group in range(metadata.num_row_groups):
                    rows = metadata.row_group(group).num_rows
                    if rows:
                        units.append(_Unit(index, group, rows))
        return units

    def _check_columns(self, path: Path, arrow_schema: pa.Schema) -> None:
        multi = set(self._multi)
        for name in self._columns:
            index = arrow_schema.get_field_index(name)
            if index < 0:
                raise SchemaError(f"{path}: column {name!r} is missing (schema {self.schema.name!r} needs it)")
            actual = arrow_schema.field(index).type
            if name == ROW_ID or name in self._single:
                ok, expected = actual == pa.int64(), "int64"
            elif name in multi:
                is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
                ok, expected = is_list and actual.value_type == pa.int64(), "list<int64>"
            else:
                ok, expected = actual == pa.float32(), "float32"
            if not ok:
                raise SchemaError(f"{path}: column {name!r} has type {actual}, expected {expected}")

    def _consumer_units(self, worker: int, epoch: int) -> List[int]:
        """Unit indices consumer (rank, worker) reads in ``epoch``, in reading order."""
        order = np.arange(len(self._units))
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self._units))
        consumers = self.world_size * self.num_workers
        return order[self.rank * self.num_workers + worker :: consumers].tolist()

    def _rows(self, worker: int, epoch: int) -> int:
        return sum(self._units[u].rows for u in self._consumer_units(worker, epoch))

    def _windows(self, worker: int, start: int) -> Iterator[Tuple[_Block, int]]:
        """(window rows in stream order, first row to use) for the stream from row ``start``.

        Windows wholly before ``start`` are skipped by their footer row counts, unread. A yielded
        block is overwritten by the next window: callers copy what they keep.
        """
        units = self._consumer_units(worker, self._epoch)
        size = self.config.shuffle_window_row_groups if self.config.shuffle else 1
        windows = [units[i : i + size] for i in range(0, len(units), size)]
        rows = [sum(self._units[u].rows for u in window) for window in windows]
        ends = np.cumsum(rows)
        first = int(np.searchsorted(ends, start, side="right"))
        if first == len(windows):
            return
        read_buffer, shuffle_buffer = self._window_buffers(max(rows[first:]))
        offset = start - (int(ends[first - 1]) if first else 0)
        for index in range(first, len(windows)):
            block = self._read(windows[index], read_buffer.head(rows[index]))
            if shuffle_buffer is not None:
                seed = [self.config.seed, self._epoch, self.rank, worker, index]
                order = np.random.default_rng(seed).permutation(len(block))
                # one gather per window is ~1.5x cheaper than a gather per batch
                block = block.take(order, shuffle_buffer.head(len(block)))
            yield block, offset
            offset = 0

    def __getstate__(self) -> Dict[str, Any]:
        # Worker processes allocate their own window buffers; never pickle them over.
        state = self.__dict__.copy()
        state["_buffers"] = None
        return state

    def _window_buffers(self, rows: int) -> Tuple[_Block, Optional[_Block]]:
        """Read and shuffle storage for windows of up to ``rows`` rows, kept across windows and
        epochs: fresh window-sized arrays are mmapped and page-faulted on every allocation, which
        cost ~30% of shuffled throughput per window and ~0.5 s at the start of every epoch."""
        if self._buffers is None or len(self._buffers[0]) < rows:
            self._buffers = (self._allocate(rows), self._allocate(rows) if self.config.shuffle else None)
        read_buffer, shuffle_buffer = self._buffers
        return read_buffer.head(rows), shuffle_buffer.head(rows) if shuffle_buffer is not None else None

    def _allocate(self, rows: int) -> _Block:
        return _Block.allocate(rows, len(self.schema.dense), len(self._single), len(self._scalars),
                               list(self.vector_widths.values()))

    def _cut(self, windows: Iterator[Tuple[_Block, int]]) -> Iterator[_Block]:
        """Batches of ``batch_size`` rows cut from the concatenated windows."""
        size = self.config.batch_size
        parts: List[_Block] = []
        filled = 0
        for block, position in windows:
            while position < len(block):
                count = min(size - filled, len(block) - position)
                parts.append(block.slice(position, position + count))
                filled += count
                position += count
                if filled == size:
                    yield _Block.concat(parts)
                    parts, filled = [], 0
        if parts and not self.config.drop_last:
            yield _Block.concat(parts)

    def _read(self, units: Sequence[int], block: _Block) -> _Block:
        """Reads row groups into ``block`` (sized to their rows), in ``units`` order, checking ids
        per row group. Returns ``block``."""
        list_parts: List[_ListParts] = [([], []) for _ in self._multi]
        start = 0
        for u in units:
            unit = self._units[u]
            path = self.files[unit.file]
            with pq.ParquetFile(path) as parquet:
                table = parquet.read_row_group(unit.row_group, columns=self._columns)
            table = self._join_side_inputs(table, unit, path)
            rows = slice(start, start + unit.rows)
            self._fill(block, rows, table, path)
            for (values, offsets), name in zip(list_parts, self._multi):
                value, offset = _list_column(table, name, path)
                values.append(value)
                offsets.append(offset)
            if self.config.validate_ids:
                self._check_ids(block, rows, list_parts, path)
            start += unit.rows
        block.lists = [_concat_lists(values, offsets) for values, offsets in list_parts]
        return block

    def _join_side_inputs(self, table: pa.Table, unit: "_Unit", path: Path) -> pa.Table:
        """Appends the wanted side-input columns of the same (part, row group); their row_ids must
        equal the dataset's, row for row (alignment is checked, never assumed)."""
        wanted: Dict[Path, List[str]] = {}
        for name in self.config.extras:
            if name in self._side:
                wanted.setdefault(self._side[name], []).append(name)
        for side_dir, names in wanted.items():
            side_path = side_dir / self.split / path.name
            with pq.ParquetFile(side_path) as parquet:
                side = parquet.read_row_group(unit.row_group, columns=[ROW_ID, *names])
            if side.num_rows != table.num_rows or not np.array_equal(
                side.column(ROW_ID).to_numpy(), table.column(ROW_ID).to_numpy()
            ):
                raise SchemaError(
                    f"{side_path} row group {unit.row_group} is not aligned with {path}: "
                    f"{side.num_rows} rows vs {table.num_rows}, or different row_ids"
                )
            for name in names:
                table = table.append_column(name, side.column(name))
        return table

    def _fill(self, block: _Block, rows: slice, table: pa.Table, path: Path) -> None:
        block.row_ids[rows] = _column(table, ROW_ID, path)
        block.labels[rows] = _column(table, self.schema.label, path)
        for j, name in enumerate(self.schema.dense):
            block.dense[j, rows] = _column(table, name, path)
        for j, name in enumerate(self._single):
            block.ids[j, rows] = _column(table, name, path)
        for j, name in enumerate(self._scalars):
            block.extras[j, rows] = _column(table, name, path)
        for vector, (name, width) in zip(block.vectors, self.vector_widths.items()):
            vector[rows] = _vector_column(table, name, width, path)

    def _check_ids(self, block: _Block, rows: slice, list_parts: List[_ListParts], path: Path) -> None:
        """Raises :class:`IdRangeError` for the first id outside [0, num_embeddings) in ``rows``.

        min/max per feature first; the offending row is searched only on failure.
        """
        ids = block.ids[:, rows]
        if ids.shape[0]:
            bad = np.flatnonzero((ids.min(axis=1) < 0) | (ids.max(axis=1) >= self._single_limits))
            if bad.size:
                feature = int(bad[0])
                limit = int(self._single_limits[feature])
                row = int(np.flatnonzero((ids[feature] < 0) | (ids[feature] >= limit))[0])
                row_id = int(block.row_ids[rows][row])
                raise _id_error(path, self._single[feature], int(ids[feature, row]), row_id, limit)
        for (values, offsets), name in zip(list_parts, self._multi):
            group_values, group_offsets = values[-1], offsets[-1]  # this row group's
            limit = self.schema.feature(name).num_embeddings
            if group_values.size and (group_values.min() < 0 or group_values.max() >= limit):
                position = int(np.flatnonzero((group_values < 0) | (group_values >= limit))[0])
                row = int(np.searchsorted(group_offsets, position, side="right")) - 1
                raise _id_error(path, name, int(group_values[position]), int(block.row_ids[rows][row]), limit)

    def _to_batch(self, block: _Block, worker: int, rows_consumed: int) -> Batch:
        size = len(block)
        if not self._multi:
            values = block.ids.reshape(-1)
            # numpy, not torch.ones: torch's parallel fill contends with Arrow's reader threads (~2 ms/batch)
            lengths = torch.from_numpy(np.ones(values.shape[0], dtype=np.int32))
            length_per_key = [size] * len(self._single)
        else:
            singles = iter(range(len(self._single)))
            lists = iter(block.lists)
            value_parts, length_parts = [], []
            for feature in self.schema.sparse:
                if feature.multi_hot:
                    value, offsets = next(lists)
                    value_parts.append(value)
                    length_parts.append(np.diff(offsets).astype(np.int32))
                else:
                    value_parts.append(block.ids[next(singles)])
                    length_parts.append(np.ones(size, dtype=np.int32))
            values = np.concatenate(value_parts)
            lengths = torch.from_numpy(np.concatenate(length_parts))
            length_per_key = [part.shape[0] for part in value_parts]
        sparse = KeyedJaggedTensor(
            keys=self.schema.sparse_names,
            values=torch.from_numpy(values),
            lengths=lengths,
            stride=size,
            length_per_key=length_per_key,
        )
        scalars = torch.from_numpy(block.extras)
        columns = {name: scalars[j] for j, name in enumerate(self._scalars)}
        columns.update((name, torch.from_numpy(vector)) for name, vector in zip(self.vector_widths, block.vectors))
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(block.dense.T)),
            sparse=sparse,
            labels=torch.from_numpy(block.labels),
            extras={name: columns[name] for name in self.config.extras},
            row_ids=torch.from_numpy(block.row_ids),
            worker=worker,
            rows_consumed=rows_consumed,
        )


def padding_batch(
    schema: Schema, size: int, extras: Sequence[str] = (), vector_widths: Optional[Dict[str, int]] = None
) -> Batch:
    """``size`` rows with every feature missing (id 0), zero dense and labels, row_id -1: what a rank
    feeds a collective forward when its own rows have run out. Extras are zero, [size], or
    [size, H] for the columns in ``vector_widths`` (a reader's :attr:`ParquetReader.vector_widths`)."""
    widths = vector_widths or {}
    keys = schema.sparse_names
    return Batch(
        dense=torch.zeros(size, len(schema.dense)),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(size * len(keys), dtype=torch.int64),
            lengths=torch.ones(size * len(keys), dtype=torch.int32),
            stride=size,
        ),
        labels=torch.zeros(size),
        extras={name: torch.zeros(size, widths[name]) if name in widths else torch.zeros(size) for name in extras},
        row_ids=torch.full((size,), -1, dtype=torch.int64),
    )


SIDE_INPUT_FILE = "side.json"


def _side_columns(
    side_inputs: Sequence[Union[str, Path]], schema: Schema, split: str, files: List[str]
) -> Tuple[Dict[str, Path], Dict[str, int]]:
    """(column -> side-input directory, vector column -> width H), for directories of per-row columns
    aligned with a dataset (``side.json`` names the scalar ``columns``, the fixed-size list
    ``vectors`` with their widths, and each split's parts, which mirror the dataset's)."""
    columns: Dict[str, Path] = {}
    widths: Dict[str, int] = {}
    for side in side_inputs:
        side = Path(side)
        manifest_path = side / SIDE_INPUT_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as error:
            raise SchemaError(f"{manifest_path}: not found; is {side} a complete side input (e.g. infer output)?") from error
        parts = manifest["splits"].get(split, {}).get("files")
        if parts != files:
            raise SchemaError(f"{manifest_path}: split {split!r} parts {parts} do not mirror the dataset's {files}")
        vectors = manifest.get("vectors", {})
        for name in [*manifest["columns"], *vectors]:
            if name in schema.columns() or name in columns:
                raise SchemaError(f"{manifest_path}: column {name!r} already exists in the dataset or another side input")
            columns[name] = side
        for name, width in vectors.items():
            if not isinstance(width, int) or width < 1:
                raise SchemaError(f"{manifest_path}: vector column {name!r} has width {width!r}, expected an int >= 1")
            widths[name] = width
    return columns, widths


def _column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise SchemaError(f"{path}: column {name!r} has {column.null_count} null values")
    return column.to_numpy()


def _vector_column(table: pa.Table, name: str, width: int, path: Path) -> np.ndarray:
    """[n, width] float32 of a fixed-size list<float32> column of that width."""
    column = table.column(name)
    if not (pa.types.is_fixed_size_list(column.type) and column.type.list_size == width):
        raise SchemaError(f"{path}: column {name!r} is {column.type}, expected fixed_size_list<float>[{width}]")
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count or array.values.null_count:
        raise SchemaError(f"{path}: column {name!r} has null vectors or null values")
    return array.flatten().to_numpy().reshape(-1, width)


def _list_column(table: pa.Table, name: str, path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(values [nnz] int64, offsets [n + 1] int64) of a list<int64> column."""
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = array.flatten()
    if array.null_count or values.null_count:
        raise SchemaError(f"{path}: column {name!r} has null lists or null ids")
    offsets = array.offsets.to_numpy().astype(np.int64)
    return values.to_numpy(), offsets - offsets[0]


def _id_error(path: Path, feature: str, value: int, row_id: int, num_embeddings: int) -> IdRangeError:
    return IdRangeError(
        f"{path}: feature {feature!r} has id {value} at row_id {row_id}, outside [0, {num_embeddings}) "
        f"(num_embeddings={num_embeddings}); the dataset does not match its schema"
    )


class ResumableLoader:
    """Runs a reader's workers in a ``DataLoader`` and tracks the position of the batches handed out.

    Each worker process gets a copy of the reader (with its position) when iteration starts; the
    batches come back in order, each naming its worker and that worker's position after it, so
    :meth:`state_dict` records exactly what this process has been given. Workers are not
    persistent, so :meth:`set_epoch` reaches them at the next ``iter()``.

    After a resume every worker's stream continues exactly; the DataLoader's round-robin over the
    workers restarts at worker 0, so batches of different workers may interleave differently.

    Workers start from a ``forkserver`` by default: a trainer process runs OpenMP, Arrow and gloo
    threads, and a plainly forked worker can inherit one of their locks held (a full test-suite run
    deadlocked that way).
    """

    def __init__(
        self,
        reader: ParquetReader,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: Optional[str] = "forkserver",
    ) -> None:
        self.reader = reader
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.reader,
            batch_size=None,
            num_workers=self.reader.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        # the workers copy the reader here, loaded position included; only then does this copy start its pass
        batches = iter(loader)
        self.reader._begin_pass()
        for batch in batches:
            self.reader._advance(batch)
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reader.load_state_dict(state)

    def num_batches(self) -> int:
        return self.reader.num_batches()
