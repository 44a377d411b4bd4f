"""What the reader hands out: :class:`Batch` (torch tensors, one per row group slice of a split), the
padding batch a rank feeds collectives when its rows run out, and :class:`RowBlock`, the column-major
numpy rows a reader window is read into and batches are cut from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys_kd.data.schema import Schema


@dataclass
class Batch(Pipelineable):
    """One batch of B rows (B == batch_size except possibly the last of a worker's epoch).

    Attributes:
        dense: [B, n_dense] float32, columns in ``schema.dense`` order.
        sparse: KeyedJaggedTensor with keys in ``schema.sparse`` order, stride B, values int64 in
            key-major order, lengths [F * B] int32 (all 1 for single-valued features); when the schema
            has a weighted feature, weights float32 like the values (each id's value, 1.0 for the ids
            of unweighted features), else no weights.
        labels: [B] float32.
        extras: name -> the configured extra columns: [B] float32, or [B, H] float32 for a side
            input's vector columns (fixed-size lists, e.g. teacher hint vectors).
        row_ids: [B] int64, the rows' ``row_id`` column.
        worker: the reader worker that produced this batch.
        rows_consumed: that worker's position after this batch (its ``rows_consumed`` entry).
        real_rows: how many of the B rows are real when the batch was padded (:meth:`padded_to`);
            None when all are.
        is_padding: a :func:`padding_batch`, holding no row of the split: what a rank steps on when
            its rows have run out (trained with weight 0, at no reader position).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    extras: Dict[str, torch.Tensor]
    row_ids: torch.Tensor
    worker: int = 0
    rows_consumed: int = 0
    real_rows: Optional[int] = None
    is_padding: bool = False

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def rows(self) -> int:
        """The real rows (B unless padded)."""
        return self.batch_size if self.real_rows is None else self.real_rows

    def real(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s rows that belong to real examples: ``[B, ...] -> [rows, ...]``."""
        return tensor if self.real_rows is None else tensor[: self.real_rows]

    def padded_to(self, size: int) -> "Batch":
        """This batch grown to ``size`` rows with padding rows (every feature missing, zero dense, label
        and extras, row_id -1), :attr:`real_rows` saying how many are real.

        Ranks of a sharded model step together, and some of torchrec's collectives need every rank's
        batch to have the same size (gloo cannot all-gather tensors of different sizes, as row-wise
        sharding's backward does); a rank's short last batch is padded, and a task module computes
        its loss on :meth:`real` rows only, so the padding changes nothing.
        """
        pad = size - self.batch_size
        if pad <= 0:
            return self
        keys = self.sparse.keys()
        lengths = self.sparse.lengths().view(len(keys), self.batch_size)
        per_key = lengths.sum(dim=1).tolist()
        values = self.sparse.values().split(per_key)
        missing = torch.zeros(pad, dtype=self.sparse.values().dtype)
        weights = self.sparse.weights_or_none()
        sparse = KeyedJaggedTensor(
            keys=keys,
            values=torch.cat([torch.cat([v, missing]) for v in values]),
            lengths=torch.cat([lengths, torch.ones(len(keys), pad, dtype=lengths.dtype)], dim=1).reshape(-1),
            stride=size,
            weights=None if weights is None else torch.cat(
                [torch.cat([w, w.new_ones(pad)]) for w in weights.split(per_key)]
            ),
        )
        return dataclasses.replace(
            self,
            dense=torch.cat([self.dense, self.dense.new_zeros(pad, self.dense.shape[1])]),
            sparse=sparse,
            labels=torch.cat([self.labels, self.labels.new_zeros(pad)]),
            extras={name: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for name, t in self.extras.items()},
            row_ids=torch.cat([self.row_ids, self.row_ids.new_full((pad,), -1)]),
            real_rows=self.rows,
        )

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


def padding_batch(
    schema: Schema, size: int, extras: Sequence[str] = (), vector_widths: Optional[Dict[str, int]] = None
) -> Batch:
    """``size`` rows with every feature missing (id 0, weight 1 when the schema is weighted), zero
    dense and labels, row_id -1: what a rank feeds a collective forward when its own rows have run
    out. Extras are zero, [size], or [size, H] for the columns in ``vector_widths`` (a reader's
    :attr:`ParquetReader.vector_widths`)."""
    widths = vector_widths or {}
    keys = schema.sparse_names
    return Batch(
        dense=torch.zeros(size, len(schema.dense)),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(size * len(keys), dtype=torch.int64),
            lengths=torch.ones(size * len(keys), dtype=torch.int32),
            stride=size,
            weights=torch.ones(size * len(keys)) if schema.weighted else None,
        ),
        labels=torch.zeros(size),
        extras={name: torch.zeros(size, widths[name]) if name in widths else torch.zeros(size) for name in extras},
        row_ids=torch.full((size,), -1, dtype=torch.int64),
        is_padding=True,
    )


@dataclass
class RowBlock:
    """N rows as column-major numpy arrays: what a reader window is read into and batches are cut from.

    Column-major because filling from Arrow columns and slicing batches are then contiguous
    copies; single-valued sparse features share one array so a batch's KJT values are one copy.
    Multi-hot features are (values [nnz], offsets [N + 1]) pairs. A weighted dataset's blocks also hold
    every id's weight: ``weights`` beside ``ids`` and ``list_weights`` beside each list's values (1.0
    for the unweighted features); an unweighted one's are empty.
    """

    row_ids: np.ndarray  # [N] int64
    labels: np.ndarray  # [N] float32
    dense: np.ndarray  # [n_dense, N] float32
    ids: np.ndarray  # [n_single, N] int64
    lists: List[Tuple[np.ndarray, np.ndarray]]  # per multi-hot feature: values [nnz], offsets [N + 1] int64
    extras: np.ndarray  # [n_extras, N] float32 (scalar extra columns)
    # per vector extra column: [N, H] float32, row-major so that a row's vector gathers as one copy
    vectors: List[np.ndarray] = field(default_factory=list)
    weights: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))  # [n_single or 0, N]
    list_weights: List[np.ndarray] = field(default_factory=list)  # per multi-hot feature [nnz] float32, or none

    @staticmethod
    def allocate(rows: int, n_dense: int, n_single: int, n_extras: int, widths: Sequence[int] = (),
                 weighted: bool = False) -> "RowBlock":
        """Uninitialized storage for ``rows`` rows (multi-hot lists are not pooled: left empty);
        ``widths``: H of each vector extra column; ``weighted``: room for the single ids' weights."""
        return RowBlock(
            row_ids=np.empty(rows, dtype=np.int64),
            labels=np.empty(rows, dtype=np.float32),
            dense=np.empty((n_dense, rows), dtype=np.float32),
            ids=np.empty((n_single, rows), dtype=np.int64),
            lists=[],
            extras=np.empty((n_extras, rows), dtype=np.float32),
            vectors=[np.empty((rows, width), dtype=np.float32) for width in widths],
            weights=np.empty((n_single if weighted else 0, rows), dtype=np.float32),
        )

    def __len__(self) -> int:
        return self.row_ids.shape[0]

    def head(self, rows: int) -> "RowBlock":
        """Views of the first ``rows`` rows' fixed-width columns; lists left empty."""
        return RowBlock(
            row_ids=self.row_ids[:rows],
            labels=self.labels[:rows],
            dense=self.dense[:, :rows],
            ids=self.ids[:, :rows],
            lists=[],
            extras=self.extras[:, :rows],
            vectors=[vector[:rows] for vector in self.vectors],
            weights=self.weights[:, :rows],
        )

    def take(self, rows: np.ndarray, out: "RowBlock") -> "RowBlock":
        """Gathers the rows at positions ``rows`` [len(out)] into ``out`` and returns it."""
        for source, target in ((self.row_ids, out.row_ids), (self.labels, out.labels)):
            _take(source, rows, target)
        for sources, targets in ((self.dense, out.dense), (self.ids, out.ids), (self.extras, out.extras),
                                 (self.weights, out.weights)):
            for source, target in zip(sources, targets):
                _take(source, rows, target)
        for source, target in zip(self.vectors, out.vectors):
            np.take(source, rows, axis=0, out=target, mode="clip")
        gathered = [_list_positions(offsets, rows) for _, offsets in self.lists]
        out.lists = [(values[source], offsets) for (values, _), (source, offsets) in zip(self.lists, gathered)]
        out.list_weights = [weights[source] for weights, (source, _) in zip(self.list_weights, gathered)]
        return out

    def slice(self, start: int, stop: int) -> "RowBlock":
        """Rows [start, stop), copied: a batch must not be a view of its window, since moving a
        tensor to shared memory (DataLoader workers) moves its whole storage."""
        rows = slice(start, stop)
        return RowBlock(
            row_ids=self.row_ids[rows].copy(),
            labels=self.labels[rows].copy(),
            dense=self.dense[:, rows].copy(),
            ids=self.ids[:, rows].copy(),
            lists=[_slice_list(values, offsets, start, stop) for values, offsets in self.lists],
            extras=self.extras[:, rows].copy(),
            vectors=[vector[rows].copy() for vector in self.vectors],
            weights=self.weights[:, rows].copy(),
            list_weights=[weights[offsets[start] : offsets[stop]].copy()
                          for weights, (_, offsets) in zip(self.list_weights, self.lists)],
        )

    @staticmethod
    def concat(blocks: Sequence["RowBlock"]) -> "RowBlock":
        if len(blocks) == 1:
            return blocks[0]
        lists = []
        for feature in range(len(blocks[0].lists)):
            values = [block.lists[feature][0] for block in blocks]
            offsets = [block.lists[feature][1] for block in blocks]
            lists.append(concat_lists(values, offsets))
        return RowBlock(
            row_ids=np.concatenate([block.row_ids for block in blocks]),
            labels=np.concatenate([block.labels for block in blocks]),
            dense=np.concatenate([block.dense for block in blocks], axis=1),
            ids=np.concatenate([block.ids for block in blocks], axis=1),
            lists=lists,
            extras=np.concatenate([block.extras for block in blocks], axis=1),
            vectors=[np.concatenate(parts) for parts in zip(*(block.vectors for block in blocks))],
            weights=np.concatenate([block.weights for block in blocks], axis=1),
            list_weights=[np.concatenate(parts) for parts in zip(*(block.list_weights for block in blocks))],
        )

    def to_batch(
        self, schema: Schema, scalars: Sequence[str], vectors: Sequence[str], extras: Sequence[str], worker: int,
        rows_consumed: int,
    ) -> Batch:
        """These rows as a :class:`Batch`. ``scalars`` and ``vectors`` name the rows of :attr:`extras` and
        the entries of :attr:`vectors`; ``extras`` is the order of :attr:`Batch.extras`."""
        size = len(self)
        single = sum(not feature.multi_hot for feature in schema.sparse)
        weights: Optional[np.ndarray] = None
        if single == len(schema.sparse):
            values = self.ids.reshape(-1)
            # numpy, not torch.ones: torch's parallel fill contends with Arrow's reader threads (~2 ms/batch)
            lengths = torch.from_numpy(np.ones(values.shape[0], dtype=np.int32))
            length_per_key = [size] * single
            if schema.weighted:
                weights = self.weights.reshape(-1)
        else:
            singles = iter(range(single))
            lists = iter(zip(self.lists, self.list_weights) if schema.weighted else ((pair, None) for pair in self.lists))
            value_parts, length_parts, weight_parts = [], [], []
            for feature in schema.sparse:
                if feature.multi_hot:
                    (value, offsets), weight = next(lists)
                    value_parts.append(value)
                    length_parts.append(np.diff(offsets).astype(np.int32))
                else:
                    j = next(singles)
                    value_parts.append(self.ids[j])
                    length_parts.append(np.ones(size, dtype=np.int32))
                    weight = self.weights[j] if schema.weighted else None
                weight_parts.append(weight)
            values = np.concatenate(value_parts)
            lengths = torch.from_numpy(np.concatenate(length_parts))
            length_per_key = [part.shape[0] for part in value_parts]
            if schema.weighted:
                weights = np.concatenate(weight_parts)
        sparse = KeyedJaggedTensor(
            keys=schema.sparse_names,
            values=torch.from_numpy(values),
            lengths=lengths,
            stride=size,
            length_per_key=length_per_key,
            weights=None if weights is None else torch.from_numpy(weights),
        )
        scalar_columns = torch.from_numpy(self.extras)
        columns = {name: scalar_columns[j] for j, name in enumerate(scalars)}
        columns.update((name, torch.from_numpy(vector)) for name, vector in zip(vectors, self.vectors))
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense.T)),
            sparse=sparse,
            labels=torch.from_numpy(self.labels),
            extras={name: columns[name] for name in extras},
            row_ids=torch.from_numpy(self.row_ids),
            worker=worker,
            rows_consumed=rows_consumed,
        )


def _take(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    # mode="clip" never clips valid positions; the default "raise" mode buffers ``out`` (a copy)
    np.take(source, rows, out=out, mode="clip")


def _slice_list(
    values: np.ndarray, offsets: np.ndarray, start: int, stop: int
) -> Tuple[np.ndarray, np.ndarray]:
    bounds = offsets[start : stop + 1]
    return values[bounds[0] : bounds[-1]].copy(), bounds - bounds[0]


def _list_positions(offsets: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Where the lists of ``rows`` lie in their values array, in that order: (positions [nnz'], new
    offsets [len(rows) + 1]); a list's values and their weights are gathered with the same positions."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position k of the output reads source starts[r] + (k - new_offsets[r]) for its row r
    source = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1], dtype=np.int64)
    return source, new_offsets


def concat_lists(
    values: Sequence[np.ndarray], offsets: Sequence[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray]:
    shifted = [offsets[0]]
    base = offsets[0][-1]
    for part in offsets[1:]:
        shifted.append(part[1:] + base)
        base += part[-1]
    return np.concatenate(values), np.concatenate(shifted)

