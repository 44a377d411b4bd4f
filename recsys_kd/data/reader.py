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

Resuming on another number of ranks or workers (:meth:`ParquetReader.load_state_dicts`, given every
rank's state) remaps the epoch's rest instead: from each old consumer's position, the windows it had
not finished (the one it was in keeps its permutation and skips the rows already handed out) are
interleaved by their place in each old consumer's stream (as consumers reading in step reach them),
and dealt round-robin to the new consumers. Every row of the epoch is then read exactly once, before and after, and when the windows
are single row groups read in order, the new ranks' batches hold the rows the old ranks' would have
held. The remapped windows are part of the saved state, so a remapped epoch resumes and remaps again.

Sparse ids are checked against ``num_embeddings`` per row group as it is read (min/max per column;
the offending row is looked up only on failure), so a bad id stops the reader before any batch
holding it reaches an embedding lookup.

Each part is checked against the checksum ``schema.json`` (a side input's part: its sidecar) recorded
when it was written, before it is opened, once per process (:mod:`recsys_kd.data.integrity`); the whole
split is checked when the reader is made. ``ReaderConfig.verify=False`` skips this.

Side-input columns (:mod:`recsys_kd.data.side_inputs`) are joined row group by row group, their
row_ids checked against the dataset's. Several workers per rank run through
:class:`recsys_kd.data.loader.ResumableLoader`, which also tracks what they have handed out.

Example::

    reader = ParquetReader("data/criteo", "train", ReaderConfig(shuffle=True), num_workers=2)
    loader = ResumableLoader(reader)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
            checkpoint["reader"] = loader.state_dict()

Longer than 500 lines because dealing rows, resuming and reading share the reader's state (units,
windows, buffers, positions) and read best in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from recsys_kd.data.batch import Batch, RowBlock, concat_lists
from recsys_kd.data.integrity import verify_dataset_part
from recsys_kd.data.parts import read_row_group
from recsys_kd.data.schema import ROW_ID, Schema, SchemaError, weight_column
from recsys_kd.data.side_inputs import join_side_columns, side_columns
from recsys_kd.memory import pin_mmap_threshold

# per multi-hot feature, the (values, offsets) arrays of each row group read so far
_ListParts = Tuple[List[np.ndarray], List[np.ndarray]]

# state_dict keys that fix which rows an epoch holds and how they are ordered: resuming under
# different values would replay other rows. The batch size is not one: a position counts rows.
_SETTINGS_KEYS = ("shuffle", "shuffle_window_row_groups", "seed", "drop_last", "split_rows")
# and those that fix which of them this consumer reads: load_state_dicts remaps a change of them
_LAYOUT_KEYS = ("rank", "world_size", "num_workers")


class IdRangeError(SchemaError):
    """A sparse id lies outside [0, num_embeddings); the message names file, feature, value, row_id."""


@dataclass
class ReaderConfig:
    """How a :class:`ParquetReader` batches and orders rows.

    ``shuffle_window_row_groups`` row groups are read together and their rows mixed; larger windows
    shuffle better and cost proportionally more memory. ``extras`` names float32 columns from
    ``schema.extra`` or a side input (e.g. teacher logits) to load into :attr:`Batch.extras`; a side
    input's fixed-size list<float32> columns (e.g. teacher hint vectors) load as [B, H]. ``verify``
    checks every part against its recorded checksum (reading each file once more per process).
    """

    batch_size: int = 4096
    shuffle: bool = False
    shuffle_window_row_groups: int = 8
    seed: int = 0
    drop_last: bool = False
    validate_ids: bool = True
    verify: bool = True
    extras: List[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_window_row_groups < 1:
            raise ValueError(f"shuffle_window_row_groups must be >= 1, got {self.shuffle_window_row_groups}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class _Unit:
    """One row group of one file: the unit rows are dealt out in."""

    file: int
    row_group: int
    rows: int


@dataclass(frozen=True)
class _Window:
    """Units read together, their rows permuted by a generator seeded with ``seed`` (None: file order);
    the first ``skip`` rows of that order were handed out before a change of world size."""

    units: Tuple[int, ...]
    seed: Optional[Tuple[int, ...]]
    skip: int = 0

    def to_json(self) -> List[Any]:
        return [list(self.units), None if self.seed is None else list(self.seed), self.skip]


class ParquetReader(IterableDataset):
    """Streams one split of a prepared dataset as :class:`Batch` objects for one rank.

    Iterate it directly when ``num_workers == 1``; with more workers run it through
    :class:`~recsys_kd.data.loader.ResumableLoader` (or ``DataLoader(reader, batch_size=None, num_workers=...)``).

    Each ``iter()`` starts the current epoch from its beginning, except the first after
    :meth:`load_state_dict`, which continues from the loaded position.

    Args:
        dataset_dir: directory with ``schema.json`` and the split's Parquet parts.
        split: split name, e.g. ``"train"``.
        config: batching and ordering.
        rank, world_size: this process's place; default from torch.distributed when initialized,
            else 0 and 1.
        num_workers: data workers per rank reading this split (consumers = world_size * num_workers).
        side_inputs: directories of columns aligned with the dataset (e.g. infer's soft labels).
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
        self._buffers: Optional[Tuple[RowBlock, Optional[RowBlock]]] = None
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
        self._info = info = self.schema.split(split)
        self.files = [self.dataset_dir / name for name in info.files]
        self._side, side_widths = side_columns(side_inputs, self.schema, split, info.files, self.config.verify)
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
        self._weighted = {f.name for f in self.schema.sparse if f.weighted}
        self._columns = [ROW_ID, self.schema.label, *self.schema.dense, *self.schema.sparse_names,
                         *self.schema.weight_columns, *own_extras]
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
        # per worker, the windows of the current epoch's rest remapped from another layout; None: dealt as usual
        self._remapped: Optional[List[List[_Window]]] = None

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
            self._remapped = None

    def state_dict(self) -> Dict[str, Any]:
        """The position: epoch and rows handed out per worker, plus what fixes the row stream;
        ``windows``, per worker, the streams of an epoch remapped from another layout (else None)."""
        return {
            "epoch": self._epoch,
            "rows_consumed": list(self._consumed),
            "windows": None if self._remapped is None else [[w.to_json() for w in ws] for ws in self._remapped],
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
        """Continues from ``state`` (of this rank, same layout) at the next ``iter()``; the stream
        settings must match. The batch size may differ: the position counts rows."""
        self._check_settings(state, _SETTINGS_KEYS + _LAYOUT_KEYS)
        epoch = int(state["epoch"])
        streams = [self._stream_of(state, worker) for worker in range(self.num_workers)]
        consumed = [self._position(state, worker, stream) for worker, stream in enumerate(streams)]
        self._epoch = epoch
        self._remapped = None if state.get("windows") is None else streams
        self._consumed = consumed
        self._resume_from = list(consumed)

    def load_state_dicts(self, states: Sequence[Dict[str, Any]]) -> None:
        """Continues the epoch that ``states`` (every rank's state, in rank order, of a run on any
        number of ranks and workers) describe, at the next ``iter()``.

        Same layout: this rank's state is loaded (:meth:`load_state_dict`). Otherwise the rows no
        old consumer handed out are dealt to this layout's consumers (see the module docstring):
        every row of the epoch is read exactly once, before or after.

        Raises:
            ValueError: the states disagree, do not match this reader's settings, or (``drop_last``,
                whose dropped rows depend on the layout) come from another layout.
        """
        if len(states) == self.world_size and states[self.rank].get("num_workers") == self.num_workers:
            self.load_state_dict(states[self.rank])
            return
        for rank, state in enumerate(states):
            self._check_settings(state, _SETTINGS_KEYS)
            if (state.get("rank"), state.get("world_size"), state.get("epoch")) != (rank, len(states), states[0].get("epoch")):
                raise ValueError(f"reader state {rank} of {len(states)}: has rank {state.get('rank')!r}, world_size "
                                 f"{state.get('world_size')!r}, epoch {state.get('epoch')!r}; not one run's states")
        if self.config.drop_last:
            raise ValueError(f"reader state of {len(states)} ranks: with drop_last, the rows an epoch drops depend on "
                             "the ranks; finish the epoch on as many ranks, or set drop_last false")
        remaining: List[Tuple[int, int, _Window]] = []  # (index in its old stream, old consumer, window)
        for state in states:
            for worker in range(int(state["num_workers"])):
                stream = self._stream_of(state, worker)
                position, start = self._position(state, worker, stream), 0
                for index, window in enumerate(stream):
                    rows = self._window_rows(window)
                    if start + rows > position:
                        skip = window.skip + max(position - start, 0)
                        remaining.append((index, state["rank"] * state["num_workers"] + worker,
                                          _Window(window.units, window.seed, skip)))
                    start += rows
        remaining.sort(key=lambda item: item[:2])  # interleaved as old consumers reading in step reach them
        consumers, first = self.world_size * self.num_workers, self.rank * self.num_workers
        self._epoch = int(states[0]["epoch"])
        self._remapped = [[window for _, _, window in remaining[first + worker :: consumers]]
                          for worker in range(self.num_workers)]
        self._consumed = [0] * self.num_workers
        self._resume_from = [0] * self.num_workers

    def _check_settings(self, state: Dict[str, Any], keys: Sequence[str]) -> None:
        current = self.state_dict()
        for key in keys:
            if state.get(key) != current[key]:
                raise ValueError(
                    f"reader state has {key}={state.get(key)!r} but this reader has {current[key]!r}; "
                    "resuming would replay different rows"
                )

    def _stream_of(self, state: Dict[str, Any], worker: int) -> List[_Window]:
        """The windows consumer ``worker`` of the run that saved ``state`` reads in its epoch."""
        if state.get("windows") is None:
            return self._dealt_windows(int(state["epoch"]), int(state["rank"]), int(state["world_size"]),
                                       int(state["num_workers"]), worker)
        try:
            stream = [_Window(tuple(int(u) for u in units), None if seed is None else tuple(int(s) for s in seed), int(skip))
                      for units, seed, skip in state["windows"][worker]]
        except (TypeError, ValueError, IndexError) as error:
            raise ValueError(f"reader state: the windows of worker {worker} are malformed ({error})") from None
        for window in stream:
            if not window.units or not all(0 <= u < len(self._units) for u in window.units) \
                    or not 0 <= window.skip < sum(self._units[u].rows for u in window.units):
                raise ValueError(f"reader state: worker {worker} has a window {window.to_json()} outside this split")
        return stream

    def _position(self, state: Dict[str, Any], worker: int, stream: List[_Window]) -> int:
        """Rows ``worker`` of ``state`` handed out, checked against its stream."""
        rows, available = int(state["rows_consumed"][worker]), sum(self._window_rows(w) for w in stream)
        if not 0 <= rows <= available:
            raise ValueError(
                f"reader state: rank {state['rank']} worker {worker} consumed {rows} rows of epoch {state['epoch']}, "
                f"which has {available}"
            )
        return rows

    def begin_pass(self) -> List[int]:
        """Positions the pass now starting begins at (one per worker); consumes a loaded position.
        Called by ``iter()``, and by a loader whose workers iterate copies of this reader."""
        start = self._resume_from or [0] * self.num_workers
        self._resume_from = None
        self._consumed = list(start)
        return start

    def advance(self, batch: Batch) -> None:
        """Records that ``batch`` was handed out (its worker's position after it)."""
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
        """Rows this rank (or one of its workers) reads in the current epoch, from footers (after a
        remap to another layout: its share of the epoch's rest)."""
        workers = range(self.num_workers) if worker is None else [worker]
        return sum(self._rows(w) for w in workers)

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch (over all its workers).

        Varies by rank and, when shuffling, by epoch: row groups differ in size.
        """
        return self._batches([0] * self.num_workers)

    def remaining_batches(self) -> int:
        """Batches the next ``iter()`` yields: those after a loaded position, else :meth:`num_batches`."""
        return self._batches(self._resume_from or [0] * self.num_workers)

    def _batches(self, start: Sequence[int]) -> int:
        size = self.config.batch_size
        rows = [self.num_rows(worker) - start[worker] for worker in range(self.num_workers)]
        if self.config.drop_last:
            return sum(n // size for n in rows)
        return sum(-(-n // size) for n in rows)

    # ----- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        worker = self._worker_id()
        start = self.begin_pass()[worker]
        position = start
        for block in self._cut(self._windows(worker, start)):
            position += len(block)
            batch = self._to_batch(block, worker, position)
            self.advance(batch)
            yield batch

    def _to_batch(self, block: RowBlock, worker: int, rows_consumed: int) -> Batch:
        return block.to_batch(self.schema, self._scalars, list(self.vector_widths), self.config.extras, worker,
                              rows_consumed)

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
            self._verify(index)
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

    def _verify(self, file_index: int) -> None:
        if self.config.verify:  # a stat when this process checked the file already
            verify_dataset_part(self.dataset_dir, self.split, self._info, self._info.files[file_index])

    def _check_columns(self, path: Path, arrow_schema: pa.Schema) -> None:
        multi = set(self._multi)
        multi_weights = {weight_column(name) for name in self._multi if name in self._weighted}
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
            elif name in multi_weights:
                is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
                ok, expected = is_list and actual.value_type == pa.float32(), "list<float>"
            else:
                ok, expected = actual == pa.float32(), "float32"
            if not ok:
                raise SchemaError(f"{path}: column {name!r} has type {actual}, expected {expected}")

    def _dealt_windows(self, epoch: int, rank: int, world_size: int, num_workers: int, worker: int) -> List[_Window]:
        """The windows consumer (rank, worker) of a layout reads in ``epoch``, in reading order."""
        order = np.arange(len(self._units))
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self._units))
        units = order[rank * num_workers + worker :: world_size * num_workers].tolist()
        size = self.config.shuffle_window_row_groups if self.config.shuffle else 1
        return [
            _Window(tuple(units[i : i + size]), (self.config.seed, epoch, rank, worker, i // size) if self.config.shuffle else None)
            for i in range(0, len(units), size)
        ]

    def _stream(self, worker: int) -> List[_Window]:
        """This rank's ``worker``'s windows of the current epoch."""
        if self._remapped is not None:
            return self._remapped[worker]
        return self._dealt_windows(self._epoch, self.rank, self.world_size, self.num_workers, worker)

    def _window_rows(self, window: _Window) -> int:
        return sum(self._units[u].rows for u in window.units) - window.skip

    def _rows(self, worker: int) -> int:
        return sum(self._window_rows(window) for window in self._stream(worker))

    def _windows(self, worker: int, start: int) -> Iterator[Tuple[RowBlock, int]]:
        """(window rows in stream order, first row to use) for the stream from row ``start``.

        Windows wholly before ``start`` are skipped by their footer row counts, unread. A yielded
        block is overwritten by the next window: callers copy what they keep.
        """
        windows = self._stream(worker)
        rows = [self._window_rows(window) for window in windows]
        ends = np.cumsum(rows)
        first = int(np.searchsorted(ends, start, side="right"))
        if first == len(windows):
            return
        read_buffer, shuffle_buffer = self._window_buffers(max(rows[i] + windows[i].skip for i in range(first, len(windows))))
        offset = start - (int(ends[first - 1]) if first else 0)
        for window in windows[first:]:
            block = self._read(window.units, read_buffer.head(self._window_rows(window) + window.skip))
            if shuffle_buffer is not None and window.seed is not None:
                order = np.random.default_rng(list(window.seed)).permutation(len(block))
                # one gather per window is ~1.5x cheaper than a gather per batch
                block = block.take(order, shuffle_buffer.head(len(block)))
            yield block, window.skip + offset
            offset = 0

    def __getstate__(self) -> Dict[str, Any]:
        # Worker processes allocate their own window buffers; never pickle them over.
        state = self.__dict__.copy()
        state["_buffers"] = None
        return state

    def _window_buffers(self, rows: int) -> Tuple[RowBlock, Optional[RowBlock]]:
        """Read and shuffle storage for windows of up to ``rows`` rows, kept across windows and
        epochs: fresh window-sized arrays are mmapped and page-faulted on every allocation, which
        cost ~30% of shuffled throughput per window and ~0.5 s at the start of every epoch."""
        if self._buffers is None or len(self._buffers[0]) < rows:
            self._buffers = (self._allocate(rows), self._allocate(rows) if self.config.shuffle else None)
        read_buffer, shuffle_buffer = self._buffers
        return read_buffer.head(rows), shuffle_buffer.head(rows) if shuffle_buffer is not None else None

    def _allocate(self, rows: int) -> RowBlock:
        return RowBlock.allocate(rows, len(self.schema.dense), len(self._single), len(self._scalars),
                                 list(self.vector_widths.values()), weighted=self.schema.weighted)

    def _cut(self, windows: Iterator[Tuple[RowBlock, int]]) -> Iterator[RowBlock]:
        """Batches of ``batch_size`` rows cut from the concatenated windows."""
        size = self.config.batch_size
        parts: List[RowBlock] = []
        filled = 0
        for block, position in windows:
            while position < len(block):
                count = min(size - filled, len(block) - position)
                parts.append(block.slice(position, position + count))
                filled += count
                position += count
                if filled == size:
                    yield RowBlock.concat(parts)
                    parts, filled = [], 0
        if parts and not self.config.drop_last:
            yield RowBlock.concat(parts)

    def _read(self, units: Sequence[int], block: RowBlock) -> RowBlock:
        """Reads row groups into ``block`` (sized to their rows), in ``units`` order, checking ids
        per row group. Returns ``block``."""
        list_parts: List[_ListParts] = [([], []) for _ in self._multi]
        weight_parts: List[List[np.ndarray]] = [[] for _ in self._multi] if self.schema.weighted else []
        start = 0
        for u in units:
            unit = self._units[u]
            path = self.files[unit.file]
            self._verify(unit.file)
            table = read_row_group(path, unit.row_group, self._columns)  # SchemaError if corrupt
            table = join_side_columns(table, self._side, self.config.extras, self.split, path, unit.row_group,
                                      self.config.verify)
            rows = slice(start, start + unit.rows)
            self._fill(block, rows, table, path)
            for (values, offsets), name in zip(list_parts, self._multi):
                value, offset = _list_column(table, name, path)
                values.append(value)
                offsets.append(offset)
            for weights, name, (values, offsets) in zip(weight_parts, self._multi, list_parts):
                weights.append(self._list_weights(table, name, path, offsets[-1]))
            if self.config.validate_ids:
                self._check_ids(block, rows, list_parts, path)
            start += unit.rows
        block.lists = [concat_lists(values, offsets) for values, offsets in list_parts]
        block.list_weights = [np.concatenate(weights) for weights in weight_parts]
        return block

    def _list_weights(self, table: pa.Table, name: str, path: Path, offsets: np.ndarray) -> np.ndarray:
        """Multi-hot feature ``name``'s id weights in ``table`` [nnz] float32 (ones when it is not
        weighted), checked to be as long as its id lists (``offsets``)."""
        if name not in self._weighted:
            return np.ones(int(offsets[-1]), dtype=np.float32)
        weights, weight_offsets = _list_column(table, weight_column(name), path)
        if not np.array_equal(weight_offsets, offsets):
            raise SchemaError(f"{path}: column {weight_column(name)!r} has lists of other lengths than column {name!r}")
        return weights

    def _fill(self, block: RowBlock, rows: slice, table: pa.Table, path: Path) -> None:
        block.row_ids[rows] = _column(table, ROW_ID, path)
        block.labels[rows] = _column(table, self.schema.label, path)
        for j, name in enumerate(self.schema.dense):
            block.dense[j, rows] = _column(table, name, path)
        for j, name in enumerate(self._single):
            block.ids[j, rows] = _column(table, name, path)
            if self.schema.weighted:
                block.weights[j, rows] = _column(table, weight_column(name), path) if name in self._weighted else 1.0
        for j, name in enumerate(self._scalars):
            block.extras[j, rows] = _column(table, name, path)
        for vector, (name, width) in zip(block.vectors, self.vector_widths.items()):
            vector[rows] = _vector_column(table, name, width, path)

    def _check_ids(self, block: RowBlock, rows: slice, list_parts: List[_ListParts], path: Path) -> None:
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
    """(values [nnz], offsets [n + 1] int64) of a list<int64> (or list<float>) column."""
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = array.flatten()
    if array.null_count or values.null_count:
        raise SchemaError(f"{path}: column {name!r} has null lists or null values")
    offsets = array.offsets.to_numpy().astype(np.int64)
    return values.to_numpy(), offsets - offsets[0]


def _id_error(path: Path, feature: str, value: int, row_id: int, num_embeddings: int) -> IdRangeError:
    return IdRangeError(
        f"{path}: feature {feature!r} has id {value} at row_id {row_id}, outside [0, {num_embeddings}) "
        f"(num_embeddings={num_embeddings}); the dataset does not match its schema"
    )


