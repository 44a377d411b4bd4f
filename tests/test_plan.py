"""The planner's view of the cluster (train/sharding.py ClusterTopology, machine_topology) and
``recsys-kd plan`` (train/plan.py): topology from flags, env and /proc/meminfo; a 2x8 plan keeps
table-row-wise shards on one host; memory per rank and all-to-all bytes against direct counts; one
line when the model does not fit."""

import re
from pathlib import Path

import pytest
import torch

from recsys_kd.cli import main
from recsys_kd.config import from_dict
from recsys_kd.train import sharding
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.plan import GIB, PlanError, all_to_all_bytes, load_sizes, plan_cluster, plan_rows
from recsys_kd.train.sharding import ClusterTopology, machine_topology

SIZES = {"a": 5000, "b": 8000, "c": 3000, "d": 6000, "e": 50}
TYPES = {"t_a": "table_wise", "t_b": "row_wise", "t_c": "column_wise", "t_d": "table_row_wise", "t_e": "data_parallel"}


def write_sizes(path: Path, sizes=SIZES) -> Path:
    path.write_text("name: toy\ndense: [x1, x2]\nsparse:\n" + "".join(f"  {k}: {v}\n" for k, v in sizes.items()))
    return path


def train_config(embedding: str = "adagrad", types=TYPES) -> TrainConfig:
    return from_dict(TrainConfig, {
        "model": {"name": "dnn", "embedding_dim": 8, "dense_mode": "projected", "mlp_layers": [16]},
        "optim": {"embedding": embedding, "dense": "adam"},
        "sharding": {"type": "table_wise", "tables": dict(types)},
    })


def test_machine_topology_from_env_and_meminfo(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemFree:         1000 kB\n")  # 16 GiB
    monkeypatch.setattr(sharding, "MEMINFO", meminfo)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    topology = machine_topology(16, torch.device("cpu"), 4096)
    assert (topology.world_size, topology.local_world_size, topology.hosts) == (16, 8, 2)
    assert topology.ddr_bytes == 16 * GIB // 8 and topology.batch_size == 4096
    assert topology.sources["local_world_size"] == "LOCAL_WORLD_SIZE" and topology.sources["ddr"] == str(meminfo)
    torchrec = topology.planner_topology()
    assert torchrec.world_size == 16 and torchrec.local_world_size == 8
    assert all(device.storage.ddr == 16 * GIB // 8 for device in torchrec.devices)
    # flags win over the environment
    given = machine_topology(16, torch.device("cuda"), 512, local_world_size=4, hbm_bytes=80 * GIB, host_memory_bytes=GIB)
    assert (given.local_world_size, given.hosts, given.hbm_bytes, given.ddr_bytes) == (4, 4, 80 * GIB, GIB // 4)
    assert given.planner_topology().devices[0].storage.hbm == 80 * GIB
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert machine_topology(2, torch.device("cpu")).local_world_size == 2  # one host, torchrun's 1xN default


def test_topology_rejects_a_world_that_is_not_whole_hosts():
    with pytest.raises(ValueError, match="not a multiple of the local world size"):
        ClusterTopology(12, 8, "cuda", GIB, GIB, 512)


def test_2x8_plan_keeps_table_row_wise_shards_on_one_host(tmp_path, monkeypatch):
    """The topology each rank of a 2 x 8 torchrun job builds (LOCAL_WORLD_SIZE=8), HBM given."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    topology = machine_topology(16, torch.device("cuda"), 1024, hbm_bytes=80 * GIB, host_memory_bytes=1024 * GIB)
    plan = plan_cluster(load_sizes(write_sizes(tmp_path / "sizes.yaml")), train_config(), topology)
    tables = {t.name: t for t in plan.tables}
    assert {name: t.sharding_type for name, t in tables.items() if name in TYPES} == TYPES
    twrw = tables["t_d"]
    assert len({topology.host_of(rank) for rank in twrw.ranks}) == 1 and len(twrw.ranks) == 8
    assert tables["t_b"].ranks == list(range(16))  # row-wise: every rank
    assert tables["t_e"].ranks == list(range(16))  # data-parallel: a copy on every rank
    assert len(tables["t_a"].ranks) == 1
    for table in plan.tables:  # shards cover the table
        if table.sharding_type in ("row_wise", "table_row_wise"):
            assert sum(rows for _, rows, _ in table.shards) == table.rows
        elif table.sharding_type in ("column_wise", "table_column_wise"):
            assert sum(cols for _, _, cols in table.shards) == table.dim
    assert [r.host for r in plan.ranks] == [0] * 8 + [1] * 8
    # what shard() planned before: world size and device only, so torchrec took all 16 ranks for one host
    before = ClusterTopology(16, 16, "cuda", 80 * GIB, 64 * GIB, 1024)
    spread = {t.name: t for t in plan_cluster(load_sizes(tmp_path / "sizes.yaml"), train_config(), before).tables}
    assert spread["t_d"].sharding_type == "table_row_wise" and len(spread["t_d"].ranks) == 16


@pytest.mark.parametrize("embedding, state", [("adagrad", lambda rows, dim: rows * dim * 4),
                                              ("rowwise_adagrad", lambda rows, dim: rows * 4),
                                              ("sgd", lambda rows, dim: 0)])
def test_memory_per_rank_adds_up_to_the_tables(tmp_path, embedding, state):
    topology = ClusterTopology(4, 2, "cuda", 80 * GIB, 64 * GIB, 256)
    plan = plan_cluster(load_sizes(write_sizes(tmp_path / "sizes.yaml")), train_config(embedding), topology)
    dim = 8
    rows = {f"t_{k}": v + 2 for k, v in SIZES.items()}  # + the reserved ids 0 and 1
    sharded = [name for name in rows if TYPES[name] != "data_parallel"]
    replicated = rows["t_e"] * dim * 4 * topology.world_size
    assert sum(r.weights for r in plan.ranks) == sum(rows[n] * dim * 4 for n in sharded) + replicated
    # the fused optimizer's state for sharded tables, Adam's two moments for the replicated one
    expected_state = sum(state(rows[n], dim) for n in sharded) + 2 * replicated
    assert abs(sum(r.optimizer for r in plan.ranks) - expected_state) <= 4 * len(plan.ranks) * len(rows)
    for memory in plan.ranks:
        assert memory.hbm == memory.weights + memory.optimizer + memory.buffers + memory.dense
        assert memory.ddr == 0
    dense = sum(p.numel() for n, p in _dense_parameters(tmp_path))
    assert plan.dense_parameters == dense and plan.ranks[0].dense == dense * 4 * 4  # weights, grads, Adam x2


def _dense_parameters(tmp_path):
    from recsys_kd.models.zoo import build_model

    model = build_model(load_sizes(write_sizes(tmp_path / "sizes.yaml")), train_config().model, torch.device("meta"))
    return [(n, p) for n, p in model.named_parameters() if ".ebc." not in f".{n}"]


def brute_force_all_to_all(sharding_type: str, shards, dim: int, batch: int, hosts: int, local: int) -> dict:
    """Follows every row of the global batch (``batch`` rows on each rank) to the table's shards and
    back, counting bytes, and those whose two ranks are on different hosts. An id goes to the shard
    holding its row: with ids uniform over the table, shard k gets it with probability rows_k / rows."""
    host = lambda rank: rank // local
    table_rows = sum(rows for _, rows, _ in shards) if sharding_type != "column_wise" else shards[0][1]
    moved = {"ids": 0.0, "embeddings": 0.0, "gradients": 0.0, "cross_host": 0.0}

    def send(kind: str, nbytes: float, a: int, b: int) -> None:
        moved[kind] += nbytes
        if kind != "gradients":  # gradients retrace the embeddings' path: counted once more below
            moved["cross_host"] += nbytes * (host(a) != host(b)) * (2 if kind == "embeddings" else 1)

    for row in range(batch * hosts * local):
        rank = row // batch  # the rank whose batch holds this row
        for index, (shard_rank, shard_rows, shard_cols) in enumerate(shards):
            if sharding_type in ("table_wise", "column_wise"):
                send("ids", 8 + 8, rank, shard_rank)  # the id and its length
                send("embeddings", shard_cols * 4, shard_rank, rank)
                send("gradients", shard_cols * 4, rank, shard_rank)
            else:  # row-wise: the id to its row's shard, the length to every shard
                send("ids", 8 * shard_rows / table_rows + 8, rank, shard_rank)
                if sharding_type == "row_wise":
                    send("embeddings", dim * 4, shard_rank, rank)  # a partial sum for every row
                    send("gradients", dim * 4, rank, shard_rank)
                else:  # table-row-wise: partial sums reduce-scattered inside the table's host, then sent on
                    reducer = shards[row % len(shards)][0]
                    send("embeddings", dim * 4, shard_rank, reducer)
                    send("gradients", dim * 4, reducer, shard_rank)
        if sharding_type == "table_row_wise":
            reducer = shards[row % len(shards)][0]
            send("embeddings", dim * 4, reducer, rank)
            send("gradients", dim * 4, rank, reducer)
    return moved


@pytest.mark.parametrize("sharding_type, shards", [
    ("table_wise", [(3, 100, 8)]),
    ("column_wise", [(0, 100, 4), (5, 100, 4)]),
    ("row_wise", [(0, 30, 8), (1, 30, 8), (2, 30, 8), (3, 10, 8), (4, 0, 8), (5, 0, 8), (6, 0, 8), (7, 0, 8)]),
    ("table_row_wise", [(4, 25, 8), (5, 25, 8), (6, 25, 8), (7, 25, 8)]),
])
def test_all_to_all_bytes_match_following_every_row(sharding_type, shards):
    """2 hosts x 4 ranks, 16 rows per rank."""
    expected = brute_force_all_to_all(sharding_type, shards, 8, 16, 2, 4)
    computed = all_to_all_bytes(sharding_type, len(shards), 8, 16 * 8, hosts=2)
    assert computed == pytest.approx(expected, abs=1)


def test_a_model_that_does_not_fit_is_one_line(tmp_path):
    sizes = write_sizes(tmp_path / "sizes.yaml", {"a": 50_000_000, "b": 40_000_000})
    topology = ClusterTopology(2, 2, "cuda", GIB // 4, GIB // 4, 512)
    with pytest.raises(PlanError) as raised:
        plan_cluster(load_sizes(sizes), train_config(types={}), topology)
    message = str(raised.value)
    assert "\n" not in message and "does not fit 2 ranks" in message
    need = (50_000_002 + 40_000_002) * 8 * 4 * 2 / GIB  # weights + adagrad state
    assert f"need {need:,.1f} GiB" in message


def test_size_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsparse: {a: 10}\ncardinalities: {}\n")
    with pytest.raises(PlanError, match="unknown key 'cardinalities'"):
        load_sizes(bad)
    bad.write_text("sparse: {a: -3}\n")
    with pytest.raises(PlanError, match="sparse.a: expected a positive integer"):
        load_sizes(bad)


def test_criteo_1tb_size_file():
    schema = load_sizes(Path(__file__).resolve().parents[1] / "configs" / "sizes" / "criteo_1tb.yaml")
    assert len(schema.sparse) == 26 and len(schema.dense) == 13
    published = [45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209,
                 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35]  # TorchRec's benchmarks/README.md
    assert [f.num_embeddings for f in schema.sparse] == [n + 2 for n in published]


def test_plan_command(tmp_path, capsys):
    sizes = write_sizes(tmp_path / "sizes.yaml")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  model: {name: dnn, embedding_dim: 8, mlp_layers: [16]}\n  sharding: {type: row_wise}\n"
                      "reader: {batch_size: 128}\n")
    code = main(["plan", "-c", str(recipe), "--world-size", "4", "--local-world-size", "2", "--hbm-gb", "16",
                 "--host-memory-gb", "64", "--sizes", str(sizes)])
    out = capsys.readouterr().out
    assert code == 0
    assert "on 4 ranks = 2 hosts x 2 (cuda), batch 128 per rank" in out
    rows = plan_rows(plan_cluster(load_sizes(sizes), from_dict(TrainConfig, {
        "model": {"name": "dnn", "embedding_dim": 8, "mlp_layers": [16]}, "sharding": {"type": "row_wise"}}),
        ClusterTopology(4, 2, "cuda", 16 * GIB, 32 * GIB, 128)))
    for row in rows["tables"]:
        assert f"{row['table']}" in out and row["sharding"] == "row_wise" and row["ranks"] == "0-3"
    assert "all-to-all per step" in out
    expected_ids = sum(all_to_all_bytes("row_wise", 4, 8, 512, hosts=2)["ids"] for _ in SIZES) / 2**20
    assert f"ids {expected_ids:,.1f} MiB" in out


def test_plan_command_without_a_gpu_needs_the_hbm_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  model: {name: dnn, embedding_dim: 8}\n")
    assert main(["plan", "-c", str(recipe), "--world-size", "4", "--sizes", str(write_sizes(tmp_path / "s.yaml"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hbm-gb" in err


def test_plan_command_reads_a_prepared_schema(tmp_path, capsys):
    """Without --sizes, the tables are the prepared dataset's (its schema.json, multi-hot noted)."""
    from recsys_kd.data.schema import IdRule, Schema, SparseFeature

    data = tmp_path / "data"
    data.mkdir()
    Schema("prepared", "label", ["x"], [SparseFeature("user", 70_000, IdRule("vocab")),
                                       SparseFeature("genres", 21, IdRule("vocab"), multi_hot=True)]).save(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"prepare: {{output: {data}}}\ntrain:\n  model: {{name: dnn, embedding_dim: 8, mlp_layers: [16]}}\n")
    assert main(["plan", "-c", str(recipe), "--world-size", "2", "--device", "cpu", "--host-memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "(prepared, 2 tables) on 2 ranks = 1 host x 2 (cpu)" in out
    assert re.search(r"^t_user +70,000 ", out, re.M) and "multi-hot features: genres" in out


def test_torchrec_stats_print_torchrecs_own_report_of_the_same_plan(tmp_path, capsys):
    topology = ClusterTopology(4, 2, "cuda", 16 * GIB, 32 * GIB, 256)
    plan = plan_cluster(load_sizes(write_sizes(tmp_path / "sizes.yaml")), train_config(), topology, torchrec_stats=True)
    out = capsys.readouterr().out
    assert "--- Planner Statistics ---" in out
    for table in plan.tables:  # torchrec's parameter table lists every table with the same sharding
        short = {"table_wise": "TW", "row_wise": "RW", "column_wise": "CW", "table_row_wise": "TWRW",
                 "data_parallel": "DP"}[table.sharding_type]
        assert re.search(rf"\.{table.name} +{short} ", out), table.name
