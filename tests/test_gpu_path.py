"""The parts of the GPU path that CPU can check: the auto planner keeps fused-optimizer tables off
data_parallel on every number of ranks, and tables built on the meta device are seeded shard by shard
to the same values under any plan."""

import math

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardMetadata

from recsys_kd.compress.sharded import shard_placement
from recsys_kd.config import ConfigError
from recsys_kd.distributed import init_distributed
from recsys_kd.models.embedding import EMBEDDING_STD, seeded_table_block
from recsys_kd.models.zoo import ModelConfig, build_model
from recsys_kd.train.config import OptimConfig
from recsys_kd.train.optimizers import CUDA_ONLY_TABLE_OPTIMIZERS, attach_table_optimizer, check_table_optimizer
from recsys_kd.train.sharding import ShardingConfig, describe_plan, machine_topology, make_plan, seed_tables, shard
from recsys_kd.train.task import LabelTask
from tests.helpers import tiny_schema


def _model():
    return build_model(tiny_schema(), ModelConfig(name="deepfm", embedding_dim=8), embedding_device=torch.device("meta"))


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_auto_keeps_tables_with_a_fused_optimizer_off_data_parallel(world_size):
    ctx = init_distributed("gloo")
    topology = machine_topology(world_size, ctx.device, 512)
    bare = describe_plan(make_plan(_model(), ShardingConfig(), topology))
    model = _model()
    attach_table_optimizer(model, OptimConfig(), ShardingConfig(), frozen=False)
    planned = describe_plan(make_plan(model, ShardingConfig(), topology))
    for table, option in planned.items():
        expected_dp = table.startswith("w_")  # D = 1: no fused kernel, data-parallel by design
        assert (option["sharding_type"] == "data_parallel") == expected_dp, (table, option)
        assert option["compute_kernel"] == ("dense" if expected_dp else "fused")
    if world_size > 1:  # what the constraint prevents: the bare planner replicates these small tables
        assert any(bare[t]["sharding_type"] == "data_parallel" for t in bare if t.startswith("t_"))
    model = _model()
    attach_table_optimizer(model, OptimConfig(), ShardingConfig(tables={"t_user": "data_parallel"}), frozen=False)
    asked = describe_plan(make_plan(model, ShardingConfig(tables={"t_user": "data_parallel"}), topology))
    assert asked["t_user"]["sharding_type"] == "data_parallel"  # asked for: kept


def test_a_seeded_block_is_the_same_block_of_the_seeded_table():
    whole = seeded_table_block(7, "t", 0, 300, 0, 16, 16)
    assert torch.equal(seeded_table_block(7, "t", 120, 50, 4, 8, 16), whole[120:170, 4:12])
    assert not torch.equal(seeded_table_block(8, "t", 0, 300, 0, 16, 16), whole)
    assert not torch.equal(seeded_table_block(7, "u", 0, 300, 0, 16, 16), whole)
    # N(0, std): mean and spread within 5 standard errors of 4800 draws
    assert abs(float(whole.mean())) < 5 * EMBEDDING_STD / math.sqrt(whole.numel())
    assert abs(float(whole.std()) / EMBEDDING_STD - 1) < 5 / math.sqrt(2 * whole.numel())


@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "column_wise"])
def test_tables_built_on_meta_are_seeded_shard_by_shard_identically_under_any_plan(kind):
    ctx = init_distributed("gloo")
    dmp, _ = shard(LabelTask(_model()), ShardingConfig(type=kind, column_wise_min_partition=4), ctx)
    seed_tables(dmp, seed=3, chunk_rows=4)  # chunks smaller than the tables
    state = dmp.state_dict()
    for key in [k for k in state if ".embedding_bags." in k]:
        value = state[key]
        full = torch.zeros(value.size())
        shards = value.local_shards() if hasattr(value, "local_shards") else []
        for s in shards:
            row0, col0 = s.metadata.shard_offsets
            full[row0:row0 + s.tensor.shape[0], col0:col0 + s.tensor.shape[1]] = s.tensor
        if not shards:
            full = value
        assert torch.equal(full, seeded_table_block(3, key, 0, full.shape[0], 0, full.shape[1], full.shape[1])), key


def test_cuda_only_table_optimizers_are_refused_on_cpu_with_the_fix():
    for name in CUDA_ONLY_TABLE_OPTIMIZERS:
        with pytest.raises(ConfigError, match=rf"train\.optim\.embedding: {name} .*CUDA only.*use sgd, adagrad or rowwise_adagrad"):
            check_table_optimizer(OptimConfig(embedding=name), torch.device("cpu"), frozen=False)
        check_table_optimizer(OptimConfig(embedding=name), torch.device("cuda", 0), frozen=False)
        check_table_optimizer(OptimConfig(embedding=name), torch.device("cpu"), frozen=True)  # frozen: SGD at lr 0
    check_table_optimizer(OptimConfig(embedding="rowwise_adagrad"), torch.device("cpu"), frozen=False)


def test_shard_placements_name_the_shards_device():
    assert shard_placement(1, torch.device("cuda", 3)) == "rank:1/cuda:3"
    assert shard_placement(0, torch.device("cpu")) == "rank:0/cpu"
    meta = ShardMetadata([0, 0], [4, 2], shard_placement(1, torch.device("cuda", 3)))
    assert meta.placement.rank() == 1 and meta.placement.device() == torch.device("cuda", 3)
