r"""AFM / SVD compression of a DistributedModelParallel-sharded model, shard by shard.

The embedding tables stay where the sharding plan put them: each rank transforms only the shards it
holds and the compressed tables come out sharded the same way (rows ``[r0, r1)`` of a table give rows
``[r0, r1)`` of its compressed table), so no rank ever holds a table, or a compressed table, it does not
own. Per table placement:

- **table-wise / row-wise / table-row-wise** (a shard holds whole rows): the shard's rows
  :math:`E_{r}` become :math:`E_{r} U_k` (or :math:`(E_r - \mu^T) U_k` centred), locally.
- **column-wise / table-column-wise** (a shard holds columns ``c`` of every row): the compressed table
  is :math:`\sum_c E_{:,c} U_{k,c}`, a sum of partial products over the ranks holding the column
  blocks. The rows are split into one block per holding rank; block by block, in chunks of
  ``chunk_rows`` rows, every rank reduces its partial product to the block's owner, which keeps it as
  its shard of the compressed table (the compressed table is row-sharded over the same ranks).
- **data-parallel** (every rank has the whole table): every rank computes the whole compressed table.

The SVD baseline needs :math:`E^T E` of each table: summed over row shards, and for column shards
assembled chunk by chunk of rows.

The statistics (AFM) are accumulated by forward hooks while every rank streams its share of the
training split through the sharded model, then all-reduced in float64; the principal directions are
computed on rank 0 and broadcast so that every rank applies bit-identical factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

from recsys_kd.compress.afm import (
    afm_embedding_columns,
    afm_embedding_rows,
    afm_up_bias,
    embedding_gram,
    pca,
)
from recsys_kd.compress.statistics import ModelStatistics, StatisticsHooks
from recsys_kd.compress.surgery import (
    RankSpec,
    compress_mlp_module,
    embedding_log_entry,
    fused_first_layer,
    rank_from_spec,
)
from recsys_kd.distributed import all_reduce, broadcast_from, collective_device, reduce_to
from recsys_kd.models.embedding import FieldEmbedding
from recsys_kd.models.low_rank import LowRankStep, find_mlp, low_rank_field_embedding, table_configs
from recsys_kd.models.zoo import CTRModel

TABLE_KEY = "model.embedding.ebc.embedding_bags.{}.weight"


@dataclass
class TableShards:
    """What this rank holds of one table: the global size, its local blocks with their offsets, and
    every rank that holds a part (the ShardedTensor's metadata); ``replicated`` for data-parallel."""

    size: Tuple[int, int]
    local: List[Tuple[torch.Tensor, int, int]]  # (block, row offset, column offset)
    holders: List[int]
    replicated: bool
    column_split: bool
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, value: Any) -> "TableShards":
        if not isinstance(value, ShardedTensor):
            return cls(tuple(value.shape), [(value, 0, 0)], list(range(dist.get_world_size())), True, False, value.dtype,
                       value.device)
        metadata = value.metadata()
        everywhere = metadata.shards_metadata
        size = tuple(value.size())
        local = [(s.tensor, s.metadata.shard_offsets[0], s.metadata.shard_offsets[1]) for s in value.local_shards()]
        holders = sorted({meta.placement.rank() for meta in everywhere})
        column_split = any(meta.shard_sizes[1] != size[1] for meta in everywhere)
        device = local[0][0].device if local else collective_device()  # holds none: where its work runs
        return cls(size, local, holders, False, column_split, metadata.tensor_properties.dtype, device)


def shard_placement(rank: int, device: torch.device) -> str:
    """A shard's placement as ShardMetadata names it: ``rank:<r>/<device>`` (``rank:1/cuda:1``,
    ``rank:0/cpu``), the device where the shard's tensor lives (a CUDA device without index: the
    current one)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return f"rank:{rank}/{device}"


def row_blocks(num_rows: int, owners: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``(owner, start, stop)``: the rows split into one contiguous block per owner, sizes differing by
    at most one (the first blocks take the remainder)."""
    base, extra = divmod(num_rows, len(owners))
    blocks, start = [], 0
    for i, owner in enumerate(owners):
        stop = start + base + (1 if i < extra else 0)
        blocks.append((owner, start, stop))
        start = stop
    return blocks


def project_table(
    table: TableShards, u_k: torch.Tensor, mu: torch.Tensor, centered: bool, chunk_rows: int = 1 << 20
) -> Any:
    r"""
    Collective (every rank calls it for every table, in the same order): the compressed table
    :math:`(E [- \mu^T]) U_k` ``[V, k]`` as this rank's part of it: a plain tensor for a data-parallel
    table, else a ShardedTensor (row shards where ``table`` has row shards; one row block per holding
    rank for column shards).
    """
    k = u_k.shape[1]
    num_rows = table.size[0]
    device = table.device
    u_k, mu = u_k.to(device), mu.to(device)
    if table.replicated:
        block, _, _ = table.local[0]
        return afm_embedding_rows(block, u_k, mu, centered)
    rank = dist.get_rank()
    shards: List[Shard] = []
    if not table.column_split:
        for block, row0, _ in table.local:
            rows = afm_embedding_rows(block, u_k, mu, centered)
            shards.append(Shard(rows, ShardMetadata([row0, 0], [block.shape[0], k], shard_placement(rank, device))))
    else:
        dtype = table.dtype
        for owner, start, stop in row_blocks(num_rows, table.holders):
            pieces = []
            for chunk_start in range(start, stop, chunk_rows):
                chunk_stop = min(stop, chunk_start + chunk_rows)
                partial = torch.zeros(chunk_stop - chunk_start, k, dtype=torch.float64, device=device)
                for block, row0, col0 in table.local:
                    rows = block[chunk_start - row0 : chunk_stop - row0]
                    width = block.shape[1]
                    partial += afm_embedding_columns(rows, u_k[col0 : col0 + width], mu[col0 : col0 + width], centered)
                reduce_to(partial, dst=owner)
                if rank == owner:
                    pieces.append(partial.to(dtype))
            if rank == owner and stop > start:
                rows = torch.cat(pieces) if pieces else torch.zeros(0, k, dtype=dtype, device=device)
                shards.append(Shard(rows, ShardMetadata([start, 0], [stop - start, k], shard_placement(rank, device))))
    return ShardedTensor._init_from_local_shards(shards, [num_rows, k])


def table_gram(table: TableShards, chunk_rows: int = 1 << 20) -> torch.Tensor:
    """Collective: :math:`E^T E` (float64 ``[D, D]``) of the whole table, the same on every rank."""
    d = table.size[1]
    if table.replicated:
        return embedding_gram(table.local[0][0])
    gram = torch.zeros(d, d, dtype=torch.float64, device=table.device)
    if not table.column_split:
        for block, _, _ in table.local:
            gram += embedding_gram(block)
        return all_reduce(gram)
    for chunk_start in range(0, table.size[0], chunk_rows):
        chunk_stop = min(table.size[0], chunk_start + chunk_rows)
        rows = torch.zeros(chunk_stop - chunk_start, d, dtype=torch.float64, device=table.device)
        for block, row0, col0 in table.local:
            rows[:, col0 : col0 + block.shape[1]] += block[chunk_start - row0 : chunk_stop - row0].to(torch.float64)
        all_reduce(rows)
        gram += embedding_gram(rows)
    return gram


def broadcast_from_main(*tensors: torch.Tensor) -> None:
    """In place: rank 0's values everywhere (the factors are computed once, applied identically)."""
    for tensor in tensors:
        broadcast_from(tensor, src=0)


# ---------------------------------------------------------------------------------------- statistics


@torch.no_grad()
def sharded_statistics(
    dmp: nn.Module, model: CTRModel, batches: Any, steps: int, padding: Any, layers: Sequence[str], fields: bool,
    progress: Optional[Any] = None,
) -> ModelStatistics:
    """
    Collective: streams ``steps`` batches per rank (this rank's iterator ``batches``, then
    ``padding()`` batches, which run the collective forward but are not counted) through ``dmp`` in eval
    mode, with :class:`StatisticsHooks` on ``model`` (the sharded model inside ``dmp``); returns the
    statistics all-reduced over ranks (float64 sums: the same for any number of ranks, up to the
    order of the additions), then broadcast from rank 0.
    """
    dmp.eval()
    iterator = iter(batches)
    with StatisticsHooks(model, layers, fields) as hooks:
        for _ in range(steps):
            batch = next(iterator, None)
            hooks.active = batch is not None
            batch = batch if batch is not None else padding()
            dmp(batch)  # a task module: forward(batch) -> (loss, outputs)
            if progress is not None:
                progress.update(1)
    stats = hooks.stats.all_reduce()
    broadcast_from_main(*stats.tensors())  # bit-identical everywhere, whatever the reduction did
    return stats


# ---------------------------------------------------------------------------------------- transforms


def compress_sharded_mlp(
    model: CTRModel,
    state: Dict[str, Any],
    ranks: Mapping[int, RankSpec],
    stats: Optional[ModelStatistics],
    relu_between: bool,
    method: str,
    mlp_path: str = "",
) -> Tuple[List[Dict[str, Any]], LowRankStep]:
    """
    The MLP step on a sharded model: the MLP is replicated (DDP), so every rank compresses it the same
    way (factors from the broadcast statistics); its entries in ``state`` (``dmp.state_dict()`` keys)
    are replaced in place. Returns the log and the structure step.
    """
    path, mlp = find_mlp(model, mlp_path or None)
    compressed, log, step = compress_mlp_module(mlp, path, dict(ranks), stats, relu_between=relu_between, method=method)
    step.mlp_path = mlp_path
    _replace_prefix(state, f"model.{path}.", compressed.state_dict())
    return log, step


def compress_sharded_embeddings(
    model: CTRModel,
    layout: FieldEmbedding,
    state: Dict[str, Any],
    ranks: Mapping[str, RankSpec],
    stats: Optional[ModelStatistics],
    fuse: bool,
    method: str,
    centered: bool,
    chunk_rows: int = 1 << 20,
) -> Tuple[List[Dict[str, Any]], LowRankStep]:
    """
    The embeddings step on a sharded model: every compressed table of ``state`` (``dmp.state_dict()``)
    is replaced by its compressed shards (:func:`project_table`), and the up-projections (or, fused, the
    first MLP layer of ``model``, the sharded model's plain replicated head) by their new values.
    ``layout`` is the model's unsharded ``FieldEmbedding`` (built on the meta device: table configs and
    field order only). Collective. Returns the log and the structure step.
    """
    embedding = layout
    if not isinstance(embedding, FieldEmbedding):
        raise ValueError(f"the embeddings step needs a FieldEmbedding, got {type(embedding).__name__}")
    num_dense, d = embedding._num_dense, embedding.embedding_dim
    configs = table_configs(embedding)
    up_weights: Dict[str, torch.Tensor] = {}
    up_biases: Dict[str, torch.Tensor] = {}
    chosen: Dict[str, int] = {}
    log: List[Dict[str, Any]] = []
    for i, name in enumerate(embedding._sparse_names):
        if name not in ranks:
            continue
        table_name = configs[name].name
        key = TABLE_KEY.format(table_name)
        table = TableShards.of(state[key])
        if method == "afm":
            assert stats is not None
            moments = stats.fields[num_dense + i]
            spectrum, vectors = pca(moments.covariance())
            mu = moments.mean()
        else:
            spectrum, vectors = pca(table_gram(table, chunk_rows))
            mu = torch.zeros(d, dtype=torch.float64, device=table.device)
        broadcast_from_main(spectrum, vectors, mu)
        k = rank_from_spec(ranks[name], spectrum, name)
        u_k = vectors[:, :k].contiguous()
        use_centered = centered and method == "afm"
        state[key] = project_table(table, u_k, mu, use_centered, chunk_rows)
        up_weights[name] = u_k.to(table.dtype)
        up_biases[name] = afm_up_bias(u_k, mu, use_centered).to(table.dtype)
        chosen[name] = k
        entry = embedding_log_entry(configs[name], method, k, spectrum, use_centered, fuse)
        entry["sharding"] = "data_parallel" if table.replicated else ("column" if table.column_split else "row")
        log.append(entry)
    new_embedding = low_rank_field_embedding(embedding, chosen, up_weights, up_biases, fuse, device=torch.device("meta"))
    for name in ("up_weight", "up_bias"):
        state.pop(f"model.embedding.{name}", None)
        if getattr(new_embedding, name) is not None:
            state[f"model.embedding.{name}"] = getattr(new_embedding, name).detach()
    if fuse:
        head_mlp = fused_first_layer(model.head, num_dense, d, embedding._sparse_names, up_weights, up_biases)
        _replace_prefix(state, "model.head.mlp.", head_mlp.state_dict())
    return log, LowRankStep(what="embeddings", ranks=chosen, fused=fuse)


def _replace_prefix(state: Dict[str, Any], prefix: str, entries: Mapping[str, torch.Tensor]) -> None:
    for key in [key for key in state if key.startswith(prefix)]:
        del state[key]
    for key, value in entries.items():
        state[prefix + key] = value.detach()
