"""``recsys-kd compress``: the sharded transform equals the single-process one (table-, row- and
column-wise tables, 2 processes), which equals the in-memory surgery; the chain is fine-tuned through
the trainer and the compressed model rebuilds from its record."""

import json

import pytest
import torch

from recsys_kd.compress import collect_statistics, compress_embeddings, compress_mlp
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.models.zoo import ModelConfig, build_model
from recsys_kd.runs import COMPRESS_STEP_RECORD, TrainOutput
from recsys_kd.train import checkpoint
from tests.trainrun import run_stage, train_on_synthetic, write_recipe

pytestmark = pytest.mark.multiprocess

MODELS = {
    "dnn": {"name": "dnn", "embedding_dim": 8, "mlp_layers": [32, 16, 16]},
    "dcn": {"name": "dcn", "embedding_dim": 8, "mlp_layers": [32, 16, 16], "cross_layers": 2},
}
MLP_RANKS = {1: 8, 2: 8}
EMBEDDING_RANK = 4
STATS_BATCH = 500


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return train_on_synthetic(tmp_path_factory.mktemp("compress"), MODELS, rows=6000, seed=5, max_steps=12)


def compress_recipe(root, model, name, sharding, finetune_epochs=0, methods=("afm", "svd"), **finetune):
    return write_recipe(root / f"{name}.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 256, "shuffle": True},
        "compress": {
            "source": str(root / model), "output": str(root / name), "batch_size": STATS_BATCH, "progress": False,
            "methods": list(methods), "sharding": {"type": sharding, "column_wise_min_partition": 4},
            "steps": [{"what": "mlp", "ranks": MLP_RANKS, "relu_between": True}, {"what": "embeddings", "rank": EMBEDDING_RANK}],
            "finetune": {"epochs": finetune_epochs, **finetune},
        },
    })


def compressed_weights(step_dir):
    """A compressed step's model, rebuilt from its record and filled from its checkpoint (one process)."""
    model = checkpoint.load_model(TrainOutput(step_dir))
    return model, model.state_dict()


def assert_same_weights(mine, theirs, atol=2e-5):
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=atol, msg=key)


def plain_model(root, model_name):
    schema = Schema.load(root / "data")
    model = build_model(schema, ModelConfig(**MODELS[model_name]))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint.load_model_tensors(root / model_name / "checkpoints" / "best", state)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return model


def train_batches(root):
    return ParquetReader(root / "data", "train", ReaderConfig(batch_size=STATS_BATCH, shuffle=False), 0, 1)


def test_sharded_compression_matches_the_in_memory_surgery_and_rebuilds(setup):
    root = setup
    assert run_stage("compress", compress_recipe(root, "dnn", "dnn_1", "column_wise", finetune_epochs=1,
                                                 eval_every_epochs=0.5), 1) == [0]
    record = json.loads((root / "dnn_1" / "compress.json").read_text())
    chain = record["chains"]["afm"]
    assert [row["stage"] for row in chain] == ["uncompressed", "mlp compressed", "mlp fine-tuned",
                                               "embeddings compressed", "embeddings fine-tuned"]
    # >= 2x fewer embedding parameters (8 -> 4 columns), fewer dense ones, fewer FLOPs
    assert chain[-1]["embedding_parameters"] * 2 == chain[0]["embedding_parameters"]
    assert chain[-1]["flops_per_example"] < chain[1]["flops_per_example"] < chain[0]["flops_per_example"]
    assert all(0.0 < row["test_auc"] < 1.0 for row in chain)

    # each step equals the plain (already tested) surgery on the unsharded model it started from
    source = plain_model(root, "dnn")
    reference = compress_mlp(source, MLP_RANKS, collect_statistics(source, train_batches(root), fields=False),
                             relu_between=True)
    assert_same_weights(compressed_weights(root / "dnn_1" / "afm" / "step1_mlp")[1], reference.state_dict())
    tuned_mlp, _ = compressed_weights(root / "dnn_1" / "afm" / "step1_mlp" / "ft")
    stats = collect_statistics(tuned_mlp, train_batches(root), layers=[], fields=True)
    reference = compress_embeddings(tuned_mlp, EMBEDDING_RANK, stats)
    compressed, weights = compressed_weights(root / "dnn_1" / "afm" / "step2_embeddings")
    assert_same_weights(weights, reference.state_dict())
    assert compressed.embedding.fused and compressed.embedding.ranks == {f"C{i}": EMBEDDING_RANK for i in range(1, 6)}

    # the record reports each compressed layer's / table's spectrum and the share of variance kept
    for step, width in (("step1_mlp", 16), ("step2_embeddings", 8)):
        for entry in json.loads((root / "dnn_1" / "afm" / step / COMPRESS_STEP_RECORD).read_text())["log"]:
            spectrum = entry["spectrum"]
            assert spectrum["dim"] == width and spectrum["cumulative"][-1] == pytest.approx(1.0)
            assert entry["kept_share"] == pytest.approx(spectrum["cumulative"][entry["k"] - 1])

    # the fine-tuning started from the compressed checkpoint and trained away from it (its last weights;
    # its best model stays the starting point when training does not beat it on validation)
    tuned = json.loads((root / "dnn_1" / "afm" / "step2_embeddings" / "ft" / "train.json").read_text())
    assert tuned["config"]["init_from"].endswith("step2_embeddings/checkpoints/best") and tuned["steps"] > 0
    # evaluated at its start, at half its epoch (the configured fraction) and at the epoch's end
    half = round(tuned["steps"] / 2)
    assert [entry["step"] for entry in tuned["history"]] == [0, half, tuned["steps"]]
    tuned_weights = checkpoint.load_model(TrainOutput(root / "dnn_1" / "afm" / "step2_embeddings" / "ft"), "latest").state_dict()
    assert any(not torch.equal(tuned_weights[k], weights[k]) for k in weights)
    if tuned["best_step"] == 0:
        _, best_weights = compressed_weights(root / "dnn_1" / "afm" / "step2_embeddings" / "ft")
        assert all(torch.equal(best_weights[k], weights[k]) for k in weights)


@pytest.mark.parametrize("model, sharding", [("dnn", "table_wise"), ("dnn", "row_wise"), ("dnn", "column_wise"),
                                             ("dcn", "column_wise"), ("dcn", "data_parallel")])
def test_two_processes_compress_exactly_like_one(setup, model, sharding):
    root = setup
    one, two = f"{model}_{sharding}_1", f"{model}_{sharding}_2"
    assert run_stage("compress", compress_recipe(root, model, one, sharding), 1) == [0]
    assert run_stage("compress", compress_recipe(root, model, two, sharding), 2) == [0, 0]
    for method in ("afm", "svd"):
        for step in ("step1_mlp", "step2_embeddings"):
            _, mine = compressed_weights(root / one / method / step)
            _, theirs = compressed_weights(root / two / method / step)
            assert_same_weights(mine, theirs)
            first = json.loads((root / one / method / step / COMPRESS_STEP_RECORD).read_text())
            second = json.loads((root / two / method / step / COMPRESS_STEP_RECORD).read_text())
            assert first["statistics_rows"] == second["statistics_rows"]
            assert first["test"]["auc"] == pytest.approx(second["test"]["auc"], abs=1e-6)
    log = json.loads((root / two / "afm" / "step2_embeddings" / COMPRESS_STEP_RECORD).read_text())["log"]
    expected = {"table_wise": "row", "row_wise": "row", "column_wise": "column", "data_parallel": "data_parallel"}[sharding]
    assert {entry["sharding"] for entry in log} == {expected}


def test_a_killed_compression_resumes_to_the_same_model(setup):
    """SIGKILL while fine-tuning step 1; the rerun keeps the finished compression, redoes the rest and
    ends with the same weights as an uninterrupted run."""
    root = setup
    whole = compress_recipe(root, "dnn", "dnn_whole", "row_wise", finetune_epochs=1, methods=("afm",))
    killed = compress_recipe(root, "dnn", "dnn_killed", "row_wise", finetune_epochs=1, methods=("afm",))
    assert run_stage("compress", whole, 1) == [0]
    assert run_stage("compress", killed, 1, fault="train_step=0:3") != [0]
    assert (root / "dnn_killed" / "afm" / "step1_mlp" / COMPRESS_STEP_RECORD).exists()
    assert not (root / "dnn_killed" / "compress.json").exists()
    assert run_stage("compress", killed, 1) == [0]
    for step in ("step1_mlp/ft", "step2_embeddings", "step2_embeddings/ft"):
        assert_same_weights(compressed_weights(root / "dnn_killed" / "afm" / step)[1],
                            compressed_weights(root / "dnn_whole" / "afm" / step)[1], atol=1e-6)
