"""Sharding: torchrec's planner with our constraints, and :func:`shard`, the one place a module is
wrapped in DistributedModelParallel (train, infer and compress all call it).

On CPU torchrec's EBC sharder allows data_parallel, table_wise, column_wise and table_column_wise;
row_wise and table_row_wise work on CPU too (the 2-process tests check they match one process) but
are not in its allow-list, so :class:`EmbeddingBagCollectionSharderAnyDevice` adds them.

The planner sees the cluster through :class:`ClusterTopology`: ranks per host, HBM per GPU, host
memory per rank and the per-rank batch size, read from the machine (:func:`machine_topology`) or
given (``recsys-kd plan``). Without it torchrec assumes every rank on one host and 32 GiB of HBM, and
a ``table_row_wise`` plan for 2 hosts x 8 GPUs would spread a table's rows over both hosts while the
runtime (which reads LOCAL_WORLD_SIZE) keeps them on one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel, ShardingEnv
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_kd.distributed import DistributedContext
from recsys_kd.models.embedding import seeded_table_block

# torchrec's planner default (torchrec.distributed.planner.constants.BATCH_SIZE), used when no batch size is known
DEFAULT_PLANNER_BATCH_SIZE = 512
MEMINFO = Path("/proc/meminfo")
_TABLE_WEIGHT = re.compile(r"\.embedding_bags\.[^.]+\.weight$")

SHARDING_TYPES = ("auto", "data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


@dataclass
class ShardingConfig:
    """``type``: one sharding type for every table, or ``auto`` (the planner chooses);
    ``tables``: per-table overrides {table name: type}, e.g. {t_C1: row_wise};
    ``column_wise_min_partition``: column shard width for column-wise tables (defaults to D/2)."""

    type: Literal["auto", "data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"] = "auto"
    tables: Dict[str, str] = field(default_factory=dict)
    column_wise_min_partition: Optional[int] = None

    def validate(self) -> None:
        for table, kind in self.tables.items():
            if kind not in SHARDING_TYPES[1:]:
                raise ValueError(f"tables.{table}: unknown sharding type {kind!r} (known: {', '.join(SHARDING_TYPES[1:])})")

    def type_of(self, table: str, embedding_dim: int) -> str:
        """The table's sharding type. Tables whose width is not a multiple of 4 (the D = 1
        first-order weights) cannot use FBGEMM's fused kernels: they are data-parallel."""
        if table in self.tables:
            return self.tables[table]
        return self.type if embedding_dim % 4 == 0 else "data_parallel"


class EmbeddingBagCollectionSharderAnyDevice(EmbeddingBagCollectionSharder):
    """torchrec's EBC sharder, with row-wise sharding allowed on CPU as well, and no DDP around the
    data-parallel tables of a one-process run (:class:`OneProcessShardedEmbeddingBagCollection`)."""

    def shard(self, module: EmbeddingBagCollection, params, env: ShardingEnv, device: Optional[torch.device] = None,
              module_fqn: Optional[str] = None) -> ShardedEmbeddingBagCollection:
        kind = OneProcessShardedEmbeddingBagCollection if env.world_size == 1 else ShardedEmbeddingBagCollection
        return kind(module=module, table_name_to_parameter_sharding=params, env=env, fused_params=self.fused_params,
                    device=device, qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn,
                    sharded_module_order_overwrite=self._sharded_module_order_overwrite)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


class OneProcessShardedEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """torchrec's sharded EBC for a one-process run. torchrec wraps the lookup of data-parallel tables
    in DDP; over one rank its allreduce leaves every gradient as it is, but its forward (a buffer
    broadcast), hooks and gloo call cost CPU every step. Here the lookups stay bare: the weights,
    gradients, parameter names and state-dict keys are those of the wrapped lookups."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._lookups = [lookup.module if isinstance(lookup, _BareLookup) else lookup for lookup in self._lookups]

    def init_data_parallel(self) -> None:
        # torchrec's state setup (run inside __init__) reads a data-parallel lookup as ``lookup.module``
        for index, sharding in enumerate(self._embedding_shardings):
            if isinstance(sharding, DpPooledEmbeddingSharding):
                self._lookups[index] = _BareLookup(self._lookups[index])


class _BareLookup(nn.Module):
    """Holds a lookup as ``.module`` while torchrec sets up its state; unwrapped right after."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def table_configs(model: nn.Module) -> Dict[str, "object"]:
    """Every embedding table of ``model`` by name (its EmbeddingBagConfig)."""
    tables = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                tables[config.name] = config
    return tables


def fused_optimizer_tables(model: nn.Module) -> List[str]:
    """Tables whose weight has an optimizer applied in the backward pass (a fused table optimizer)."""
    return [name for module in model.modules() if isinstance(module, EmbeddingBagCollection)
            for name, bag in module.embedding_bags.items() if getattr(bag.weight, "_optimizer_classes", None)]


def data_parallel_tables(model: nn.Module, config: ShardingConfig) -> List[str]:
    return [name for name, table in table_configs(model).items() if config.type_of(name, table.embedding_dim) == "data_parallel"]


@dataclass(frozen=True)
class ClusterTopology:
    """The cluster a plan is made for. ``hbm_bytes``: memory of one GPU (None on CPU);
    ``ddr_bytes``: host memory per rank (the host's memory / ``local_world_size``); ``batch_size``:
    rows per rank per step; ``sources``: where each value came from (flag, env, machine, default),
    for the printout."""

    world_size: int
    local_world_size: int
    device: Literal["cpu", "cuda"]
    hbm_bytes: Optional[int]
    ddr_bytes: int
    batch_size: int
    sources: Dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.local_world_size < 1 or self.batch_size < 1:
            raise ValueError(f"world size, local world size and batch size must be >= 1, got "
                             f"{self.world_size}, {self.local_world_size}, {self.batch_size}")
        if self.world_size % self.local_world_size:
            raise ValueError(f"world size {self.world_size} is not a multiple of the local world size "
                             f"{self.local_world_size} (ranks per host)")

    @property
    def hosts(self) -> int:
        return self.world_size // self.local_world_size

    def host_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def planner_topology(self) -> Topology:
        """torchrec's ``Topology`` for this cluster."""
        return Topology(
            world_size=self.world_size, compute_device=self.device, local_world_size=self.local_world_size,
            hbm_cap=self.hbm_bytes if self.device == "cuda" else None, ddr_cap=self.ddr_bytes,
        )


def machine_topology(
    world_size: int,
    device: torch.device,
    batch_size: Optional[int] = None,
    *,
    local_world_size: Optional[int] = None,
    hbm_bytes: Optional[int] = None,
    host_memory_bytes: Optional[int] = None,
) -> ClusterTopology:
    """The topology of the machine this runs on, each value overridable: ranks per host from the
    argument, else LOCAL_WORLD_SIZE (torchrun sets it), else the visible GPUs (cuda), else
    ``world_size``; HBM from the argument, else the GPU's properties; host memory from the argument,
    else /proc/meminfo; the batch size from the argument, else torchrec's default.

    Example::

        machine_topology(16, torch.device("cuda", 0), 4096)  # on each of 2 hosts with 8 GPUs
    """
    sources = {}
    if local_world_size is not None:
        local, sources["local_world_size"] = local_world_size, "given"
    elif os.environ.get("LOCAL_WORLD_SIZE"):
        local, sources["local_world_size"] = int(os.environ["LOCAL_WORLD_SIZE"]), "LOCAL_WORLD_SIZE"
    elif device.type == "cuda" and torch.cuda.is_available():
        local, sources["local_world_size"] = min(world_size, torch.cuda.device_count()), "visible GPUs"
    else:
        local, sources["local_world_size"] = world_size, "one host"
    hbm = None
    if device.type == "cuda":
        if hbm_bytes is not None:
            hbm, sources["hbm"] = hbm_bytes, "given"
        elif torch.cuda.is_available():
            hbm, sources["hbm"] = torch.cuda.get_device_properties(device).total_memory, "GPU properties"
        else:
            raise ValueError("no GPU here to read the HBM size from: give it (recsys-kd plan --hbm-gb)")
    if host_memory_bytes is not None:
        host, sources["ddr"] = host_memory_bytes, "given"
    else:
        host, sources["ddr"] = host_memory(), str(MEMINFO)
    if batch_size is not None:
        sources["batch_size"] = "given"
    else:
        batch_size, sources["batch_size"] = DEFAULT_PLANNER_BATCH_SIZE, "torchrec default"
    return ClusterTopology(world_size, local, "cuda" if device.type == "cuda" else "cpu", hbm,
                           host // max(1, local), batch_size, sources)


def host_memory() -> int:
    """This host's memory in bytes (MemTotal of /proc/meminfo)."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{MEMINFO}: no MemTotal line")


def table_constraints(model: nn.Module, config: ShardingConfig, device_type: str) -> Dict[str, ParameterConstraints]:
    """The configured sharding type of every table not left to the planner (``auto``), with the
    kernel that type needs: dense for data_parallel (plain DDP parameters, any optimizer), fused
    otherwise.

    Under ``auto``, a table given a fused optimizer (:func:`~recsys_kd.train.optimizers.attach_table_optimizer`)
    is never made data-parallel: the planner may choose it for a small table on one number of ranks
    and not on another, and the table would then train with the dense optimizer instead of its own
    and its checkpoint would not resume on the other number of ranks."""
    constraints = {}
    sharded_types = [kind for kind in EmbeddingBagCollectionSharderAnyDevice().sharding_types(device_type)
                     if kind != ShardingType.DATA_PARALLEL.value]
    fused = fused_optimizer_tables(model)
    for name, table in table_configs(model).items():
        kind = config.type_of(name, table.embedding_dim)
        if kind == "auto":
            if name in fused:
                constraints[name] = ParameterConstraints(sharding_types=sharded_types,
                                                         compute_kernels=[EmbeddingComputeKernel.FUSED.value])
            continue
        kernel = EmbeddingComputeKernel.DENSE.value if kind == "data_parallel" else EmbeddingComputeKernel.FUSED.value
        min_partition = None
        if kind in ("column_wise", "table_column_wise"):
            min_partition = config.column_wise_min_partition or max(1, table.embedding_dim // 2)
        constraints[name] = ParameterConstraints(sharding_types=[kind], compute_kernels=[kernel], min_partition=min_partition)
    return constraints


def planner(
    model: nn.Module, config: ShardingConfig, topology: ClusterTopology, debug: bool = False, **options
) -> EmbeddingShardingPlanner:
    """torchrec's planner for ``model``'s tables under ``config`` on ``topology``; ``debug`` makes it
    log its statistics table; ``options``: more EmbeddingShardingPlanner arguments (``callbacks``)."""
    return EmbeddingShardingPlanner(
        topology=topology.planner_topology(), batch_size=topology.batch_size,
        constraints=table_constraints(model, config, topology.device), debug=debug, **options,
    )


def make_plan(model: nn.Module, config: ShardingConfig, topology: ClusterTopology) -> ShardingPlan:
    """Collective: plans every table on rank 0 with the configured type (or the planner's choice) and
    broadcasts the plan."""
    return planner(model, config, topology).collective_plan(
        model, [EmbeddingBagCollectionSharderAnyDevice()], dist.GroupMember.WORLD
    )


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict[str, object]]:
    """{table: {sharding_type, compute_kernel, ranks}} for the run record."""
    described = {}
    for module_plan in plan.plan.values():
        for table, option in module_plan.items():
            described[table] = {
                "sharding_type": option.sharding_type,
                "compute_kernel": option.compute_kernel,
                "ranks": list(option.ranks or []),
            }
    return described


def shard(
    module: nn.Module, config: ShardingConfig, ctx: DistributedContext, batch_size: Optional[int] = None
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """
    Collective: plans ``module``'s tables (``config``) for this process group on this machine's
    topology (:func:`machine_topology`; ``batch_size`` rows per rank per step) and wraps it in
    DistributedModelParallel; returns (the sharded module, the plan).

    Tables are materialised shard by shard, so a module built with its tables on the meta device
    never holds a full table on any rank. No optimizer is involved: a trainer attaches the fused
    table optimizer before (``apply_optimizer_in_backward``), a reader of checkpoints just loads.

    Example::

        dmp, plan = shard(LabelTask(build_model(schema, config, embedding_device=torch.device("meta"))),
                          ShardingConfig(type="row_wise"), init_distributed())
    """
    plan = make_plan(module, config, machine_topology(ctx.world_size, ctx.device, batch_size))
    dmp = DistributedModelParallel(
        module, device=ctx.device, plan=plan, sharders=[EmbeddingBagCollectionSharderAnyDevice()],
        data_parallel_wrapper=OneProcessDataParallel() if ctx.world_size == 1 else None,
    )
    return dmp, plan


class OneProcessDataParallel(DataParallelWrapper):
    """The data-parallel wrapper of a one-process run: none. DDP's gradient allreduce over one rank
    leaves every gradient as it is (the mean of one), but its per-step hooks, bucket copies and gloo
    call cost CPU; without it the weights, gradients and parameter names are the same."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        del dmp, env, device  # nothing to wrap: one process has no other replica to average with


@torch.no_grad()
def seed_tables(dmp: nn.Module, seed: int, chunk_rows: int = 1 << 16) -> None:
    """Fills every embedding table this rank holds (its shards, or the whole of a data-parallel
    table) with the seeded values of :func:`~recsys_kd.models.embedding.seeded_table_block`, on the
    shard's device, ``chunk_rows`` rows at a time: no rank ever builds a table it does not hold, and
    every sharding plan and number of ranks starts from the same tables. Each table's stream is named
    by its state-dict key, so two models' tables of one name (a student and its co-trained teacher)
    start apart."""
    for key, value in dmp.state_dict().items():
        if not _TABLE_WEIGHT.search(key):
            continue
        if isinstance(value, ShardedTensor):
            dim = value.size()[1]
            blocks = [(s.tensor, s.metadata.shard_offsets[0], s.metadata.shard_offsets[1]) for s in value.local_shards()]
        else:
            dim, blocks = value.shape[1], [(value, 0, 0)]
        for block, row0, col0 in blocks:
            for start in range(0, block.shape[0], chunk_rows):
                stop = min(block.shape[0], start + chunk_rows)
                values = seeded_table_block(seed, key, row0 + start, stop - start, col0, block.shape[1], dim, block.device)
                block[start:stop].copy_(values)
