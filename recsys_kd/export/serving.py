"""The serving module: a plain-tensor, torch-only, scriptable copy of a trained ``CTRModel``.

Input contract (``forward(dense, ids, offsets, weights=None) -> probabilities``)::

    dense    float32 [B, n_dense]        the schema's dense columns, in schema order ([B, 0] when none)
    ids      int64   [N]                 sparse ids, concatenated bag after bag
    offsets  int64   [B * F_sparse + 1]  bag boundaries: bag k holds ids[offsets[k] : offsets[k + 1]]
    weights  float32 [N]                 only for a model of weighted features (libSVM/libFM values):
                                         each id's value, 1.0 for the ids of unweighted features; a bag
                                         pools sum(weight * row). Required there, refused elsewhere

Bags are **example-major**: bag ``k = b * F_sparse + f`` holds example ``b``'s ids of sparse feature ``f``
(``schema.sparse`` order), so one example's request is one contiguous slice of ``ids`` and requests are
concatenated as they come. A single-valued feature has a bag of length 1, a multi-hot feature a bag
of any length (an empty bag pools to zeros, as torchrec's sum pooling does). For a batch of
single-valued features only, ``ids`` is the ``[B, F_sparse]`` id matrix flattened row by row and
``offsets`` is ``arange(B * F_sparse + 1)``; that case takes a faster path (one plain
``F.embedding`` lookup). Ids are the dataset's ids: 0 = missing, 1 = out of vocabulary, and every id
must lie in ``[0, num_embeddings)`` of its feature, otherwise ``forward`` raises an error naming the
feature, the example and the id (checked before any lookup). Output: probabilities ``[B]`` float32
(``forward_logits`` returns the logits).

How it is fast: at small batches serving is bound by the number of ops (about 10 us each), not by
FLOPs. So every sparse table is concatenated row-wise into one table ``[sum_f V_f, D]`` (plus one
column for the first-order weight when the model has a first-order term), and a feature's ids are
shifted by its row offset: ONE lookup gathers every field of every example, with no Python loop over
fields; and :func:`script_serving` freezes the module. The dense projection is a broadcast multiply.
The head is the trained model's own head, copied unchanged (it is scriptable). The fused table is
built in :mod:`recsys_kd.export.tables`.

AFM-compressed models (a ``LowRankFieldEmbedding``: field tables ``[V_f, k_f]``, ranks may differ per
field) keep the one lookup: every table is zero-padded to the widest field ``W = max_f w_f`` (``w_f =
k_f`` for a compressed field, D for a kept one), so the gather returns codes ``[B, F_sparse, W]``. Then
either the per-field up-projections run as one batched product ``e_f = U_f c_f + b_f`` (``[F, D, W]``,
zero columns beyond each ``w_f``, identity for kept fields) back to ``[B, F, D]``, or, when the
up-projections were fused into the head's first Linear, the head reads the concatenated codes
``[B, n_dense * D + sum_f w_f]`` (the padding columns are dropped).

Storage of the fused table: ``float32`` (exact), ``fp16`` (half the bytes; upcast after the lookup) or
``int8`` (per-row asymmetric quantisation, ``w ~ q * scale + bias`` with one float32 scale and bias per
row, dequantised after the lookup; the first-order weights stay float32 beside the scales).

This file imports torch only: the torchrec model is read through its attributes, never imported.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys_kd.export.dagfm_serving import serving_head
from recsys_kd.export.inputs import bag_rows, check_weights
from recsys_kd.export.tables import (STORAGE_DTYPES, field_tables, fused_storage, lookup_buffers, low_rank_projections,
                                     stacked_up_projections)

if TYPE_CHECKING:  # pragma: no cover
    from recsys_kd.models.zoo import CTRModel

INPUT_ORDER = "example-major"


class ServingModel(nn.Module):
    """
    A trained CTR model as one fused embedding lookup + the model's head, taking plain tensors.

    Build it with :meth:`from_model`; see the module docstring for the input contract.

    Args:
        head (nn.Module): the model's head, ``(fields [B, F, D], first_order [B, 1] or None) -> [B]``.
        tables (List[torch.Tensor]): the sparse field tables ``[V_f, w_f]`` in ``schema.sparse`` order (``w_f = D``
            unless the model was AFM-compressed).
        sparse_names (List[str]): the sparse features, same order.
        dense_weight (Optional[torch.Tensor]): ``[n_dense, D]`` projection of the dense fields, or None
            when dense features are not model inputs.
        first_order_tables (Optional[List[torch.Tensor]]): the first-order tables ``[V_f, 1]``, when the
            model has a first-order term.
        first_order_dense (Optional[torch.Tensor]): ``[n_dense, 1]`` first-order dense weights.
        first_order_bias (Optional[torch.Tensor]): ``[1]``.
        num_dense_inputs (int): width of the ``dense`` input (the schema's dense columns); it may be
            wider than the model uses only when ``dense_weight`` is None (then ``dense`` is ignored).
        storage (str): ``"float32"``, ``"fp16"`` or ``"int8"``.
        embedding_dim (Optional[int]): D of the field embeddings the head reads; defaults to the tables'
            width, which must then be the same for every table.
        up_weights (Optional[List[Optional[torch.Tensor]]]): per sparse feature, the up-projection
            ``[D, w_f]`` of a low-rank table ``[V_f, w_f]`` (None for a full-width table): the head reads
            ``[B, F, D]`` fields ``e_f = U_f c_f + b_f``.
        up_biases (Optional[List[Optional[torch.Tensor]]]): the matching biases ``[D]`` (None: zero).
        codes_to_head (bool): the head reads the concatenated codes ``[B, n_dense * D + sum_f w_f]``
            (AFM up-projections fused into its first Linear) instead of ``[B, F, D]`` fields.
        weighted (bool): the model's features are weighted: ``forward`` takes each id's weight.

    Shapes: ``dense [B, n_dense]``, ``ids [N]``, ``offsets [B * F_sparse + 1] -> [B]``.

    Example::

        serving = ServingModel.from_model(model.eval(), num_dense_inputs=len(schema.dense))
        ids, offsets = example_major_inputs(kjt.values(), kjt.lengths(), batch_size, len(schema.sparse))
        probabilities = script_serving(serving)(dense, ids, offsets)  # [B]
    """

    def __init__(
        self,
        head: nn.Module,
        tables: List[torch.Tensor],
        sparse_names: List[str],
        dense_weight: Optional[torch.Tensor] = None,
        first_order_tables: Optional[List[torch.Tensor]] = None,
        first_order_dense: Optional[torch.Tensor] = None,
        first_order_bias: Optional[torch.Tensor] = None,
        num_dense_inputs: int = 0,
        storage: str = "float32",
        embedding_dim: Optional[int] = None,
        up_weights: Optional[List[Optional[torch.Tensor]]] = None,
        up_biases: Optional[List[Optional[torch.Tensor]]] = None,
        codes_to_head: bool = False,
        weighted: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(tables, sparse_names, storage, up_weights, codes_to_head, first_order_tables)
        widths = [int(t.shape[1]) for t in tables]
        dim = _embedding_dim(widths, embedding_dim)
        _check_widths(widths, dim, sparse_names, up_weights, codes_to_head)
        num_dense = _num_dense(dense_weight, num_dense_inputs)
        width = max(widths)  # W: every table is zero-padded to it, so one lookup serves all fields

        self.head = head
        self.sparse_names: List[str] = list(sparse_names)
        self.num_sparse: int = len(tables)
        self.num_dense: int = num_dense
        self.num_dense_inputs: int = num_dense_inputs
        self.embedding_dim: int = dim
        self.table_width: int = width
        self.with_first_order: bool = first_order_tables is not None
        self.weighted: bool = weighted
        self.storage: str = storage
        self._int8: bool = storage == "int8"
        self._fp16: bool = storage == "fp16"
        self._project: bool = up_weights is not None
        self._codes_to_head: bool = codes_to_head
        self._uniform_width: bool = len(set(widths)) == 1

        up_weight, up_bias = stacked_up_projections(widths, dim, up_weights, up_biases)
        buffers = {
            **lookup_buffers(tables, widths),
            "up_weight": up_weight,
            "up_bias": up_bias,
            **fused_storage(tables, first_order_tables, width, storage),
            **_dense_buffers(dense_weight, first_order_dense, first_order_bias, num_dense, dim),
        }
        for name, buffer in buffers.items():
            self.register_buffer(name, buffer)

    @classmethod
    def from_model(
        cls, model: "CTRModel", num_dense_inputs: Optional[int] = None, storage: str = "float32"
    ) -> "ServingModel":
        """
        Builds the serving module from a plain (unsharded) ``CTRModel``; the model is not modified.
        Its ``embedding`` is a ``FieldEmbedding`` or an AFM/SVD-compressed ``LowRankFieldEmbedding``
        (per-field up-projections, or fused into the head: the head's first Linear reads the codes).

        Args:
            model (CTRModel): the trained model (tables on CPU, not sharded).
            num_dense_inputs (Optional[int]): width of the ``dense`` input, ``len(schema.dense)``;
                defaults to the number of dense fields the model projects.
            storage (str): ``"float32"``, ``"fp16"`` or ``"int8"`` for the fused table.
        """
        embedding = model.embedding
        sparse_names, tables = field_tables(embedding)
        num_dense = 0 if embedding.dense_weight is None else int(embedding.dense_weight.shape[0])
        first_order_tables = first_order_dense = first_order_bias = None
        if model.first_order is not None:
            fo_names, first_order_tables = field_tables(model.first_order.weights)
            if fo_names != sparse_names:
                raise ValueError(f"first-order features {fo_names} differ from the field features {sparse_names}")
            first_order_dense = model.first_order.weights.dense_weight
            first_order_bias = model.first_order.bias
        up_weights, up_biases, codes_to_head = low_rank_projections(embedding, sparse_names)
        head = serving_head(copy.deepcopy(model.head).eval())[0]
        return cls(
            head,
            tables,
            sparse_names,
            dense_weight=embedding.dense_weight,
            first_order_tables=first_order_tables,
            first_order_dense=first_order_dense,
            first_order_bias=first_order_bias,
            num_dense_inputs=num_dense if num_dense_inputs is None else num_dense_inputs,
            storage=storage,
            embedding_dim=int(embedding.embedding_dim),
            up_weights=up_weights,
            up_biases=up_biases,
            codes_to_head=codes_to_head,
            weighted=bool(embedding.ebc.is_weighted()),
        )

    def forward(
        self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            dense (torch.Tensor): float32 [B, n_dense].
            ids (torch.Tensor): int64 [N], example-major bags.
            offsets (torch.Tensor): int64 [B * F_sparse + 1].
            weights (Optional[torch.Tensor]): float32 [N], each id's weight; exactly when the model is
                weighted.

        Returns:
            torch.Tensor: click probabilities, float32 [B].
        """
        return torch.sigmoid(self.forward_logits(dense, ids, offsets, weights))

    @torch.jit.export
    def forward_logits(
        self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """As :meth:`forward`, returning logits [B]."""
        if dense.dim() != 2 or dense.size(1) != self.num_dense_inputs:
            raise ValueError(
                f"dense must have shape [B, {self.num_dense_inputs}] (the schema's dense columns), "
                f"got {list(dense.shape)}"
            )
        if dense.dtype != torch.float32:
            raise ValueError("dense must be float32")
        batch_size = dense.size(0)
        check_weights(weights, ids, self.weighted)
        rows, single = bag_rows(
            ids, offsets, batch_size, self.num_embeddings, self.row_offsets, self.bag_feature, self.sparse_names
        )
        if batch_size == 0:  # some heads cannot reshape an empty batch
            return torch.zeros(0)
        return self.logits_from_rows(dense, rows, offsets, single, weights)

    def logits_from_rows(
        self, dense: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, single: bool,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The model past the input checks: logits [B] of ``dense`` [B >= 1, n_dense], the fused-table
        ``rows`` [N] of the ids (``_bag_rows``) and the bag ``offsets``, unused when ``single`` (one id
        per bag, ``rows`` [B * F_sparse]); ``weights`` [N] scale the ids' rows before pooling."""
        batch_size = dense.size(0)
        num_features = self.num_sparse
        width = self.table_width
        columns = width + (1 if self.with_first_order else 0)
        # the lookup: every field of every example in one gather (+ sum pooling of the bags)
        if self._int8 or weights is not None:
            if self._int8:
                params = self.row_params.index_select(0, rows)  # [N, 2 (+1)]: scale, bias (, first-order weight)
                values = self.codes.index_select(0, rows).float() * params[:, 0:1] + params[:, 1:2]
                if self.with_first_order:
                    values = torch.cat([values, params[:, 2:3]], dim=1)
            else:
                values = F.embedding(rows, self.weight).float()  # [N, W (+1)]
            if weights is not None:  # each id's row (first-order weight too) times its value
                values = values * weights.unsqueeze(1)
            if single:
                pooled = values
            else:
                positions = torch.arange(rows.size(0), dtype=torch.int64)
                pooled = F.embedding_bag(positions, values, offsets, mode="sum", include_last_offset=True)
        else:
            if single:
                pooled = F.embedding(rows, self.weight)
            else:
                pooled = F.embedding_bag(rows, self.weight, offsets, mode="sum", include_last_offset=True)
            if self._fp16:
                pooled = pooled.float()
        pooled = pooled.view(batch_size, num_features, columns)  # [B, F_sparse, W (+1)]

        codes = pooled.narrow(2, 0, width) if self.with_first_order else pooled  # [B, F_sparse, W]
        dense_fields: Optional[torch.Tensor] = None
        if self.num_dense > 0:
            dense_fields = dense.unsqueeze(2) * self.dense_weight  # [B, n_dense, D]
        if self._codes_to_head:
            flat = codes.reshape(batch_size, num_features * width)
            if not self._uniform_width:
                flat = flat.index_select(1, self.code_columns)  # drop the padding: [B, sum_f w_f]
            fields = flat if dense_fields is None else torch.cat([dense_fields.flatten(1), flat], dim=1)
        else:
            if self._project:  # e_f = U_f c_f + b_f for every field at once, batched over f
                # [F, B, W] @ [F, W, D] -> [F, B, D], handed on as a [B, F, D] view: half the time of the
                # einsum, which copies both layouts; heads reshape their input themselves
                codes = torch.baddbmm(
                    self.up_bias.unsqueeze(1), codes.transpose(0, 1), self.up_weight.transpose(1, 2)
                ).transpose(0, 1)
            fields = codes if dense_fields is None else torch.cat([dense_fields, codes], dim=1)
        first_order: Optional[torch.Tensor] = None
        if self.with_first_order:
            first = pooled.select(2, width).sum(dim=1, keepdim=True)  # [B, 1]
            if self.num_dense > 0:
                first = first + torch.mm(dense, self.first_order_dense)
            first_order = first + self.first_order_bias
        return self.head(fields, first_order)


# ------------------------------------------------------------------------- the constructor's steps


def _check_arguments(
    tables: List[torch.Tensor],
    sparse_names: List[str],
    storage: str,
    up_weights: Optional[List[Optional[torch.Tensor]]],
    codes_to_head: bool,
    first_order_tables: Optional[List[torch.Tensor]],
) -> None:
    """A known storage; one table, one up-projection (or None) and one first-order table per feature."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {list(STORAGE_DTYPES)}, got {storage!r}")
    if not tables or len(tables) != len(sparse_names):
        raise ValueError(f"need one table per sparse feature: {len(tables)} tables, {len(sparse_names)} names")
    if up_weights is not None and codes_to_head:
        raise ValueError("up_weights and codes_to_head exclude each other: the head reads fields or codes")
    if up_weights is not None and len(up_weights) != len(tables):
        raise ValueError(f"need one up-projection (or None) per sparse feature, got {len(up_weights)}")
    if first_order_tables is not None and [t.shape[0] for t in first_order_tables] != [t.shape[0] for t in tables]:
        raise ValueError("first-order tables must have the rows of the field tables")


def _embedding_dim(widths: List[int], embedding_dim: Optional[int]) -> int:
    """D of the fields the head reads: ``embedding_dim``, else the tables' one common width."""
    if embedding_dim is not None:
        return embedding_dim
    if len(set(widths)) != 1:
        raise ValueError(f"tables of different widths {sorted(set(widths))} need embedding_dim")
    return widths[0]


def _check_widths(
    widths: List[int],
    dim: int,
    sparse_names: List[str],
    up_weights: Optional[List[Optional[torch.Tensor]]],
    codes_to_head: bool,
) -> None:
    """Each table is D wide, or up-projected from its width to D, or read as codes by the head."""
    for f, width in enumerate(widths):
        projection = up_weights[f] if up_weights is not None else None
        if projection is not None:
            if tuple(projection.shape) != (dim, width):
                raise ValueError(
                    f"up-projection of {sparse_names[f]!r} is {list(projection.shape)}, expected [{dim}, {width}]"
                )
        elif width != dim and not codes_to_head:
            raise ValueError(f"table {sparse_names[f]!r} has width {width}, not D = {dim}, and no up-projection")


def _num_dense(dense_weight: Optional[torch.Tensor], num_dense_inputs: int) -> int:
    """How many dense fields the model projects (0 when dense features are not model inputs)."""
    num_dense = 0 if dense_weight is None else int(dense_weight.shape[0])
    if dense_weight is not None and num_dense_inputs != num_dense:
        raise ValueError(f"num_dense_inputs is {num_dense_inputs} but the model projects {num_dense} dense fields")
    return num_dense


def _dense_buffers(
    dense_weight: Optional[torch.Tensor],
    first_order_dense: Optional[torch.Tensor],
    first_order_bias: Optional[torch.Tensor],
    num_dense: int,
    dim: int,
) -> Dict[str, torch.Tensor]:
    """The dense projection ``[n_dense, D]``, the first-order dense weights ``[n_dense, 1]`` and bias
    ``[1]``, float32 copies (empty or zero when absent)."""
    return {
        "dense_weight": dense_weight.detach().float().clone() if dense_weight is not None else torch.zeros(0, dim),
        "first_order_dense": first_order_dense.detach().float().reshape(-1, 1).clone()
        if first_order_dense is not None
        else torch.zeros(num_dense, 1),
        "first_order_bias": first_order_bias.detach().float().reshape(1).clone()
        if first_order_bias is not None
        else torch.zeros(1),
    }


def script_serving(serving: ServingModel, roundtrip: bool = True) -> torch.jit.ScriptModule:
    """
    ``torch.jit.script`` + ``torch.jit.freeze`` (eval mode, ``forward_logits`` preserved) of a serving
    module: parameters become constants and the storage branches fold away.

    Args:
        serving (ServingModel): the module.
        roundtrip (bool): return the module as ``torch.jit.load`` gives it back from its serialised
            bytes. In torch 2.13 a runtime error inside code that freezing inlined from a dropped
            method (e.g. a head's ``forward_with_hidden``) can crash the interpreter while it builds
            the error's call stack, for the second frozen module of a class in one process; a loaded
            module owns its code and raises normally. Saved artifacts are always loaded modules.

    Returns:
        torch.jit.ScriptModule: ``forward(dense, ids, offsets)`` and ``forward_logits``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # every torch.jit call warns in torch 2.13
        frozen = torch.jit.freeze(torch.jit.script(serving.eval()), preserved_attrs=["forward_logits"])
        if not roundtrip:
            return frozen
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def example_major_inputs(
    values: torch.Tensor, lengths: torch.Tensor, batch_size: int, num_features: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Reorders key-major jagged ids (a ``KeyedJaggedTensor``'s ``values()`` / ``lengths()``: every
    example of feature 0, then feature 1, ...) into the serving module's example-major ``ids`` and
    ``offsets``.

    Args:
        values (torch.Tensor): ids [N], key-major.
        lengths (torch.Tensor): bag lengths [F * B], key-major (any integer dtype).
        batch_size (int): B.
        num_features (int): F (the schema's sparse features, in order).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``ids`` int64 [N] and ``offsets`` int64 [B * F + 1],
        example-major.
    """
    return _example_major(values.to(torch.int64), lengths, batch_size, num_features)


def example_major_weights(
    weights: torch.Tensor, lengths: torch.Tensor, batch_size: int, num_features: int
) -> torch.Tensor:
    """A ``KeyedJaggedTensor``'s key-major ``weights()`` [N] in the example-major order
    :func:`example_major_inputs` gives its ids: the serving module's ``weights`` float32 [N]."""
    return _example_major(weights.to(torch.float32), lengths, batch_size, num_features)[0]


def _example_major(
    values: torch.Tensor, lengths: torch.Tensor, batch_size: int, num_features: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key-major jagged ``values`` (any dtype) in example-major order, and the bag offsets."""
    if lengths.numel() != batch_size * num_features:
        raise ValueError(f"lengths has {lengths.numel()} bags, expected B * F = {batch_size} * {num_features}")
    lengths = lengths.to(torch.int64)
    if bool((lengths == 1).all()):  # single-valued: a transpose
        ids = values.view(num_features, batch_size).t().reshape(-1)
        return ids, torch.arange(batch_size * num_features + 1, dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths  # key-major bag starts
    by_example = lengths.view(num_features, batch_size).t().reshape(-1)
    starts = starts.view(num_features, batch_size).t().reshape(-1)
    offsets = torch.zeros(by_example.numel() + 1, dtype=torch.int64)
    torch.cumsum(by_example, 0, out=offsets[1:])
    total = int(offsets[-1])
    # output position k of bag j reads values[starts[j] + (k - offsets[j])]
    source = torch.repeat_interleave(starts - offsets[:-1], by_example, output_size=total)
    source = source + torch.arange(total, dtype=torch.int64)
    return values[source], offsets
