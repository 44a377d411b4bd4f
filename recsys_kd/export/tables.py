"""The serving module's one fused embedding table, built from a trained model's tables.

Reading the model: :func:`field_tables` gives a ``FieldEmbedding``'s (or ``FirstOrder``'s) per-feature
tables, :func:`low_rank_projections` the per-field up-projections of an AFM/SVD-compressed
``LowRankFieldEmbedding``. Both read the torchrec modules through their attributes, so this file
imports torch only.

Building the buffers: every table ``[V_f, w_f]`` is zero-padded to the widest ``W`` and concatenated
row-wise, with the first-order weight as one more column, stored float32, fp16 or int8
(:func:`fused_storage`, :func:`quantize_rows_int8`); :func:`lookup_buffers` says where each feature's
rows start; the up-projections become one batched ``[F, D, W]`` stack (:func:`stacked_up_projections`).
:func:`serving_bytes` reports the sizes: per example gathered from the table, and the rest.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPES = ("float32", "fp16", "int8")


def fused_storage(
    tables: List[torch.Tensor], first_order_tables: Optional[List[torch.Tensor]], width: int, storage: str
) -> Dict[str, torch.Tensor]:
    """
    The buffers ``weight``, ``codes`` and ``row_params`` of the fused table (the unused ones empty).

    float32 / fp16 storage: ``weight [R, W (+1)]``, the first-order weight as its last column.
    int8 storage: ``codes [R, W]`` int8 and ``row_params [R, 2 (+1)]`` = (scale, bias (, first-order
    weight)) float32.

    Args:
        tables (List[torch.Tensor]): the field tables ``[V_f, w_f]``, ``w_f <= width``.
        first_order_tables (Optional[List[torch.Tensor]]): ``[V_f, 1]`` each, or None.
        width (int): W, the padded width.
        storage (str): one of :data:`STORAGE_DTYPES`.
    """
    fused = torch.cat([F.pad(t.detach().float(), (0, width - int(t.shape[1]))) for t in tables], dim=0)  # [R, W]
    first = (
        torch.cat([t.detach().float() for t in first_order_tables], dim=0)
        if first_order_tables is not None
        else torch.zeros(fused.shape[0], 0)
    )  # [R, 1] or [R, 0]
    if storage == "int8":
        codes, scale, bias = quantize_rows_int8(fused)
        return {
            "weight": torch.zeros(0, width + first.shape[1]),
            "codes": codes,
            "row_params": torch.cat([scale, bias, first], dim=1),
        }
    weight = torch.cat([fused, first], dim=1)
    return {
        "weight": weight.half() if storage == "fp16" else weight,
        "codes": torch.zeros(0, width, dtype=torch.int8),
        "row_params": torch.zeros(0, 2 + first.shape[1]),
    }


def lookup_buffers(tables: List[torch.Tensor], widths: List[int]) -> Dict[str, torch.Tensor]:
    """Where each feature's rows start in the fused table, and where its code columns sit in the
    flattened ``[F, W]`` codes (column ``j < w_f`` of field ``f`` at ``f * W + j``)."""
    sizes = torch.tensor([int(t.shape[0]) for t in tables], dtype=torch.int64)
    width = max(widths)
    return {
        "num_embeddings": sizes,
        "row_offsets": torch.cumsum(sizes, 0) - sizes,
        "bag_feature": torch.arange(len(tables), dtype=torch.int64),
        "code_columns": torch.cat([f * width + torch.arange(w, dtype=torch.int64) for f, w in enumerate(widths)]),
    }


def stacked_up_projections(
    widths: List[int],
    dim: int,
    up_weights: Optional[List[Optional[torch.Tensor]]],
    up_biases: Optional[List[Optional[torch.Tensor]]],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The per-field up-projections as one batch: ``up_weight [F, D, W]`` (zero columns beyond each
    field's width ``w_f``; the identity for a full-width table, which keeps its field exact) and
    ``up_bias [F, D]``; both with 0 fields when ``up_weights`` is None.
    """
    num_fields = len(widths) if up_weights is not None else 0
    up_weight = torch.zeros(num_fields, dim, max(widths))
    up_bias = torch.zeros(num_fields, dim)
    if up_weights is not None:
        for f, width in enumerate(widths):
            projection = up_weights[f]
            if projection is None:
                up_weight[f, :, :dim] = torch.eye(dim)
            else:
                up_weight[f, :, :width] = projection.detach().float()
                if up_biases is not None and up_biases[f] is not None:
                    up_bias[f] = up_biases[f].detach().float()
    return up_weight, up_bias


def quantize_rows_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Per-row asymmetric int8 quantisation: ``weight ~ codes * scale + bias``.

    Each row's range [min, max] maps onto the 256 codes -128..127 (``scale = (max - min) / 255``,
    ``bias = min + 128 * scale``); a constant row gets scale 1 and is exact. The error per entry is at
    most ``scale / 2``.

    Args:
        weight (torch.Tensor): float [R, D].

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: codes int8 [R, D], scale float32 [R, 1],
        bias float32 [R, 1].
    """
    weight = weight.detach().float()
    if weight.numel() == 0:
        rows = weight.shape[0]
        return weight.to(torch.int8), torch.ones(rows, 1), torch.zeros(rows, 1)
    low = weight.min(dim=1, keepdim=True).values
    high = weight.max(dim=1, keepdim=True).values
    span = high - low
    scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
    codes = torch.clamp(torch.round((weight - low) / scale) - 128.0, -128.0, 127.0).to(torch.int8)
    return codes, scale, low + 128.0 * scale


def field_tables(embedding: nn.Module) -> Tuple[List[str], List[torch.Tensor]]:
    """(sparse feature names in field order, their tables) of a ``FieldEmbedding``."""
    num_dense = 0 if embedding.dense_weight is None else int(embedding.dense_weight.shape[0])
    sparse_names = list(embedding.field_names[num_dense:])
    ebc = embedding.ebc
    by_feature = {}
    for config in ebc.embedding_bag_configs():
        if len(config.feature_names) != 1:
            raise ValueError(f"table {config.name!r} serves {config.feature_names}; expected one feature per table")
        pooling = getattr(config.pooling, "name", str(config.pooling))
        if pooling != "SUM":
            raise ValueError(f"table {config.name!r} uses {pooling} pooling; the serving module sums bags")
        weight = ebc.embedding_bags[config.name].weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or weight.device.type == "meta":
            raise ValueError(
                f"table {config.name!r} is a {type(weight).__name__} on {weight.device}; the serving module needs "
                "a plain model with its tables loaded (recsys_kd.train.checkpoint.load_model builds one)"
            )
        by_feature[config.feature_names[0]] = weight
    missing = [name for name in sparse_names if name not in by_feature]
    if missing:
        raise ValueError(f"no table for sparse features {missing}")
    return sparse_names, [by_feature[name].detach() for name in sparse_names]


def low_rank_projections(
    embedding: nn.Module, sparse_names: List[str]
) -> Tuple[Optional[List[Optional[torch.Tensor]]], Optional[List[Optional[torch.Tensor]]], bool]:
    """(up-projections ``[D, k_f]`` or None per sparse feature, their biases, whether the head reads the
    concatenated codes) of a ``LowRankFieldEmbedding``; (None, None, False) for a ``FieldEmbedding``."""
    ranks = getattr(embedding, "ranks", None)
    if ranks is None:
        return None, None, False
    if bool(embedding.fused):
        return None, None, True
    weights: List[Optional[torch.Tensor]] = [None] * len(sparse_names)
    biases: List[Optional[torch.Tensor]] = [None] * len(sparse_names)
    for i, name in enumerate(embedding._compressed):
        f = sparse_names.index(name)
        weights[f] = embedding.up_weight[i, :, : int(ranks[name])].detach()  # stored padded to k_max
        biases[f] = embedding.up_bias[i].detach()
    return weights, biases, False


def serving_bytes(serving: nn.Module) -> Dict[str, int]:
    """
    A serving module's sizes: its fused table's rows, all its bytes, the bytes one example gathers
    from the table (one row per sparse field) and the bytes of the rest (head, projections), which a
    call reads once whatever its batch size.
    """
    tensors = [*serving.buffers(), *serving.parameters()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    table = [serving.weight, serving.codes, serving.row_params]
    row_bytes = sum(t.shape[1] * t.element_size() for t in table if t.shape[0] > 0)
    return {
        "fused_table_rows": int(serving.num_embeddings.sum()),
        "bytes": total,
        "gathered_bytes_per_example": serving.num_sparse * row_bytes,
        "head_bytes": total - sum(t.numel() * t.element_size() for t in table),
    }
