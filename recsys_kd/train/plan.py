"""``recsys-kd plan``: will a model fit a cluster, and how will it be sharded, before renting it.

Builds the recipe's model with its tables on the meta device at full size (from a prepared schema,
or a size file of published cardinalities such as configs/sizes/criteo_1tb.yaml), attaches the
table optimizer the trainer would attach, and runs torchrec's planner (enumerator, storage and perf
estimators, proposers, partitioner) for a :class:`ClusterTopology` given by flags. Nothing is
allocated: a 64-rank plan of Criteo 1TB's 178 million table rows runs on a laptop.

The result, :class:`ClusterPlan`, holds per table its sharding type, kernel, shards and ranks, and
the bytes one training step moves through the sparse all-to-alls; per rank the table weights,
their optimizer state, the planner's input/output buffer estimate and the replicated dense part,
against HBM and host memory. A model that does not fit raises :class:`PlanError`, one line.

All-to-all bytes per step (N = batch_size x world_size rows, one id per feature and row, ids
uniform over a table's rows, int64 ids and lengths, float32 embeddings; each rank's own slice counted
like the others):

==================  ==========================  =========================  ====================
sharding (S shards) ids and lengths (forward)   embeddings (forward)       gradients (backward)
==================  ==========================  =========================  ====================
table_wise          N x 16                      N x D x 4                  as embeddings
column_wise         S x N x 16                  N x D x 4                  as embeddings
row_wise            N x 8 + S x N x 8           S x N x D x 4              as embeddings
table_row_wise      N x 8 + S x N x 8           (S + 1) x N x D x 4        as embeddings
data_parallel       0 (an all-reduce of the table's gradient instead: rows x D x 4)
==================  ==========================  =========================  ====================

Row-wise sends each id to the rank holding its row and every row's length to every shard rank;
each shard rank returns a partial sum for every row (a reduce-scatter). Table-row-wise does that on
the table's host (the reduce-scatter stays inside the host), then sends each row's sum to the row's
rank. Across hosts: every byte has the row's rank at one end, and rows are spread evenly over the H
hosts, so (H - 1) / H of it crosses hosts, except table-row-wise's reduce-scatter (none).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import torch
import yaml
from torch import nn
from torchrec.distributed.planner.types import PlannerError, ShardingOption
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_kd.data.schema import RESERVED_IDS, IdRule, Schema, SparseFeature
from recsys_kd.models.zoo import build_model
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.optimizers import attach_table_optimizer
from recsys_kd.train.sharding import ClusterTopology, EmbeddingBagCollectionSharderAnyDevice, planner, table_configs

GIB = 1024**3
STATS_LOGGER = "torchrec.distributed.planner.stats"  # where torchrec's planner logs its statistics table
ID_BYTES = 8  # int64 ids and lengths in the KeyedJaggedTensor
# optimizer state per weight element: what the fused kernels keep (rowwise_adagrad: one float per row)
FUSED_STATE = {"sgd": 0.0, "adagrad": 1.0, "rowwise_adagrad": None}
DENSE_STATE = {"sgd": 0.0, "adagrad": 1.0, "adam": 2.0}


class PlanError(ValueError):
    """The model does not fit the cluster, or its sizes cannot be read (one line)."""


@dataclass
class TablePlan:
    """One table's plan: ``shards`` are (rank, rows, columns); ``a2a`` bytes per step by direction
    (ids, embeddings, gradients) and ``cross_host``, the part of them that crosses hosts."""

    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    shards: List[tuple]
    a2a: Dict[str, int]
    allreduce_bytes: int

    @property
    def ranks(self) -> List[int]:
        return sorted({rank for rank, _, _ in self.shards})


@dataclass
class RankMemory:
    """Bytes on one rank: table weights and optimizer state, the planner's buffer estimate (inputs,
    outputs of the lookups), the dense part (replicated weights + gradients + optimizer state), and
    the totals in HBM and host memory (DDR) as the planner placed them."""

    rank: int
    host: int
    weights: int = 0
    optimizer: int = 0
    buffers: int = 0
    dense: int = 0
    hbm: int = 0
    ddr: int = 0


@dataclass
class ClusterPlan:
    """The planner's answer for one model on one cluster: its tables in the model's order, every
    rank's memory, the dense part's parameter count, and notes on what the figures leave out."""

    topology: ClusterTopology
    model: str
    tables: List[TablePlan]
    ranks: List[RankMemory]
    dense_parameters: int
    notes: List[str] = field(default_factory=list)

    def a2a_total(self) -> Dict[str, int]:
        total = {"ids": 0, "embeddings": 0, "gradients": 0, "cross_host": 0}
        for table in self.tables:
            for key, value in table.a2a.items():
                total[key] += value
        return total

    def headline(self, dataset: str) -> str:
        """What was planned for which cluster, and where each figure of the cluster came from."""
        topology = self.topology
        hosts = f"{topology.hosts} host" + ("s" if topology.hosts > 1 else "")
        sources = ", ".join(f"{key} from {source}" for key, source in topology.sources.items())
        return (f"{self.model} ({dataset}, {len(self.tables)} tables) on {topology.world_size} ranks = {hosts} x "
                f"{topology.local_world_size} ({topology.device}), batch {topology.batch_size:,} per rank ({sources})")

    def summary(self) -> List[str]:
        """The communication of one step, the dense part, and the notes."""
        a2a, mib = self.a2a_total(), lambda value: f"{value / 2**20:,.1f} MiB"
        allreduce = sum(t.allreduce_bytes for t in self.tables)
        return [f"all-to-all per step: ids {mib(a2a['ids'])}, embeddings {mib(a2a['embeddings'])} (forward), "
                f"gradients {mib(a2a['gradients'])} (backward), of which {mib(a2a['cross_host'])} across hosts; "
                f"all-reduce of data-parallel tables {mib(allreduce)}; dense part {self.dense_parameters:,} "
                f"parameters (replicated)", *(f"note: {note}" for note in self.notes)]


def load_sizes(path: Union[str, Path]) -> Schema:
    """A size file as a schema (no splits): ``name``, ``dense`` (feature names) and ``sparse``
    ({feature: distinct values}); each table gets the reserved ids 0 (missing) and 1 (out of
    vocabulary) on top, as ``prepare`` gives it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise PlanError(f"{path}: cannot read the size file ({' '.join(str(error).split())})") from error
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping with keys name, dense, sparse")
    unknown = sorted(set(data) - {"name", "dense", "sparse"})
    if unknown:
        raise PlanError(f"{path}: unknown key {unknown[0]!r} (known: name, dense, sparse)")
    sparse = data.get("sparse")
    if not isinstance(sparse, dict) or not sparse:
        raise PlanError(f"{path}: 'sparse' must map each sparse feature to its number of distinct values")
    for feature, count in sparse.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise PlanError(f"{path}: sparse.{feature}: expected a positive integer, got {count!r}")
    dense = data.get("dense") or []
    if not isinstance(dense, list):
        raise PlanError(f"{path}: 'dense' must be a list of feature names")
    return Schema(
        name=str(data.get("name") or path.stem), label="label", dense=[str(name) for name in dense],
        sparse=[SparseFeature(str(name), count + RESERVED_IDS, IdRule("vocab")) for name, count in sparse.items()],
    )


def plan_cluster(
    schema: Schema, config: TrainConfig, topology: ClusterTopology, torchrec_stats: bool = False
) -> ClusterPlan:
    """
    Plans ``config.model`` for ``schema``'s tables on ``topology`` with torchrec's planner, on the
    meta device; returns the plan with per-rank memory and all-to-all bytes per step.
    ``torchrec_stats``: torchrec's own report of the plan (its planner's statistics table, what
    torchrec prints for a dry run) goes to stdout as well.

    Raises:
        PlanError: the model does not fit (one line: the capacity and what the tables need).

    Example::

        plan = plan_cluster(load_sizes("configs/sizes/criteo_1tb.yaml"), recipe.train,
                            ClusterTopology(64, 8, "cuda", 80 * GIB, 256 * GIB, 4096))
    """
    model = build_model(schema, config.model, embedding_device=torch.device("meta"))
    attach_table_optimizer(model, config.optim, config.sharding, frozen=config.freeze_embeddings)
    chosen: List[List[ShardingOption]] = []

    def keep(best: List[ShardingOption]) -> List[ShardingOption]:
        chosen.append(best)
        return best

    stats_logger = logging.getLogger(STATS_LOGGER)
    handler = logging.StreamHandler(sys.stdout)
    propagate = stats_logger.propagate
    if torchrec_stats:
        stats_logger.addHandler(handler)
        stats_logger.setLevel(logging.INFO)
        stats_logger.propagate = False  # once, on stdout
    try:
        planner(model, config.sharding, topology, debug=torchrec_stats, callbacks=[keep]).plan(
            model, [EmbeddingBagCollectionSharderAnyDevice()]
        )
    except PlannerError as error:
        raise PlanError(_does_not_fit(model, config, topology, error)) from None
    finally:
        stats_logger.removeHandler(handler)
        stats_logger.propagate = propagate
    dense_parameters = sum(p.numel() for name, p in model.named_parameters() if not _is_table(model, name))
    dense_bytes = dense_parameters * 4 * (2 + DENSE_STATE[config.optim.dense])  # weights, gradients, state
    ranks = [RankMemory(rank, topology.host_of(rank), dense=dense_bytes) for rank in range(topology.world_size)]
    tables = []
    for option in chosen[0]:
        element = option.tensor.element_size()
        rows, dim = option.tensor.shape
        state = _state_per_element(option, config, dim)
        shards = []
        for shard in option.shards:
            weights = math.prod(shard.size) * element
            optimizer = math.ceil(weights * state)
            memory = ranks[shard.rank]
            memory.weights += weights
            memory.optimizer += optimizer
            memory.buffers += max(0, shard.storage.hbm + shard.storage.ddr - weights - optimizer)
            memory.hbm += shard.storage.hbm
            memory.ddr += shard.storage.ddr
            shards.append((shard.rank, shard.size[0], shard.size[1]))
        tables.append(TablePlan(
            option.name, rows, dim, option.sharding_type, option.compute_kernel, shards,
            all_to_all_bytes(option.sharding_type, len(shards), dim, topology.batch_size * topology.world_size,
                             topology.hosts),
            rows * dim * element if option.sharding_type == "data_parallel" else 0,
        ))
    for memory in ranks:
        if topology.device == "cuda":
            memory.hbm += dense_bytes
        else:
            memory.ddr += dense_bytes
    notes = ["one id per feature and row assumed (multi-hot features move more)"]
    replicated = sum(t.allreduce_bytes for t in tables)
    if replicated:
        size = f"{replicated / 2**20:,.1f} MiB" if replicated >= 2**20 else f"{replicated / 2**10:,.1f} KiB"
        notes.append(f"the gradients of data-parallel tables ({size} per rank) are not in the memory figures")
    if any(feature.multi_hot for feature in schema.sparse):
        notes.append("multi-hot features: " + ", ".join(f.name for f in schema.sparse if f.multi_hot))
    order = list(table_configs(model))
    return ClusterPlan(topology, config.model.name, sorted(tables, key=lambda t: order.index(t.name)), ranks,
                       dense_parameters, notes)


def all_to_all_bytes(sharding_type: str, shards: int, dim: int, rows: int, hosts: int = 1) -> Dict[str, int]:
    """Bytes one step moves through the sparse all-to-alls for one table (the table in the module
    docstring): ``rows`` is the global batch, ``shards`` the table's shard count, ``hosts`` the
    cluster's; ``cross_host`` is the part of ids + embeddings + gradients that crosses hosts."""
    if sharding_type == "data_parallel":
        return {"ids": 0, "embeddings": 0, "gradients": 0, "cross_host": 0}
    pooled = rows * dim * 4
    if sharding_type == "table_wise":
        ids, embeddings = rows * 2 * ID_BYTES, pooled
    elif sharding_type in ("column_wise", "table_column_wise"):
        ids, embeddings = shards * rows * 2 * ID_BYTES, pooled
    elif sharding_type in ("row_wise", "table_row_wise"):
        ids, embeddings = rows * ID_BYTES + shards * rows * ID_BYTES, shards * pooled
    else:
        raise PlanError(f"no all-to-all model for sharding type {sharding_type!r}")
    crossing = ids + 2 * embeddings
    if sharding_type == "table_row_wise":
        embeddings += pooled  # the host's sums to the rows' ranks, after the reduce-scatter inside the host
        crossing = ids + 2 * pooled
    return {"ids": ids, "embeddings": embeddings, "gradients": embeddings,
            "cross_host": round(crossing * (hosts - 1) / hosts)}


def _state_per_element(option: ShardingOption, config: TrainConfig, dim: int) -> float:
    """Optimizer state per weight element of a table: the fused optimizer's for sharded tables, the
    dense optimizer's for data-parallel ones (plain DDP parameters); none when frozen."""
    if option.sharding_type == "data_parallel":
        return DENSE_STATE[config.optim.dense]
    if config.freeze_embeddings:
        return 0.0
    state = FUSED_STATE[config.optim.embedding]
    return 1.0 / dim if state is None else state


def _is_table(model: nn.Module, parameter: str) -> bool:
    for name, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection) and parameter.startswith(f"{name}."):
            return True
    return False


def _does_not_fit(model: nn.Module, config: TrainConfig, topology: ClusterTopology, error: PlannerError) -> str:
    need = 0.0
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                weights = table.num_embeddings * table.embedding_dim * 4
                state = FUSED_STATE[config.optim.embedding]
                need += weights * (1 + (1.0 / table.embedding_dim if state is None else state))
    per_rank = (topology.hbm_bytes or 0) + topology.ddr_bytes
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return (f"{config.model.name} does not fit {topology.world_size} ranks ({topology.hosts} host(s) x "
            f"{topology.local_world_size}) with {_gib(topology.hbm_bytes or 0)} GiB HBM + {_gib(topology.ddr_bytes)} GiB "
            f"host memory per rank: its tables need {_gib(need)} GiB (weights + {config.optim.embedding} state) of "
            f"{_gib(per_rank * topology.world_size)} GiB in the cluster, before buffers and the dense part; "
            f"more ranks, more memory per rank, a smaller embedding_dim or batch size would help "
            f"(torchrec: {first})")


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def plan_rows(plan: ClusterPlan) -> Dict[str, List[Dict[str, object]]]:
    """The plan as printable rows: ``tables``, and ``ranks`` (consecutive ranks with the same figures
    share one row)."""
    mib = lambda value: round(value / 2**20, 1)
    tables = [{
        "table": t.name, "rows": t.rows, "dim": t.dim, "sharding": t.sharding_type, "kernel": t.compute_kernel,
        "ranks": _ranges(t.ranks), "a2a MiB/step": mib(t.a2a["ids"] + t.a2a["embeddings"] + t.a2a["gradients"]),
        "across hosts": mib(t.a2a["cross_host"]), "allreduce MiB/step": mib(t.allreduce_bytes),
    } for t in plan.tables]
    capacity_hbm = plan.topology.hbm_bytes or 0
    ranks: List[Dict[str, object]] = []
    for m in plan.ranks:
        row = {
            "ranks": str(m.rank), "host": str(m.host), "weights GiB": _gib(m.weights), "optimizer GiB": _gib(m.optimizer),
            "buffers GiB": _gib(m.buffers), "dense GiB": _gib(m.dense),
            "HBM GiB": f"{_gib(m.hbm)} / {_gib(capacity_hbm)}" if plan.topology.device == "cuda" else "-",
            "host GiB": f"{_gib(m.ddr)} / {_gib(plan.topology.ddr_bytes)}",
        }
        previous = ranks[-1] if ranks else None
        if previous and all(previous[k] == row[k] for k in row if k not in ("ranks", "host")):
            previous["ranks"] = f"{str(previous['ranks']).split('-')[0]}-{m.rank}"
            if str(previous["host"]).split("-")[-1] != row["host"]:
                previous["host"] = f"{str(previous['host']).split('-')[0]}-{m.host}"
        else:
            ranks.append(row)
    return {"tables": tables, "ranks": ranks}


def _ranges(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: List[List[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
