import itertools
import json
import math

import numpy as np
import pytest
import torch

from recsys_kd.cli import main
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.runs import TrainOutput
from recsys_kd.train import checkpoint
from recsys_kd.train.metrics import auc, classification_metrics, logloss


def test_auc_is_the_pairwise_probability_with_half_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for s_p, s_n in itertools.product(scores[labels == 1], scores[labels == 0])]
    assert auc(labels, scores) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert math.isnan(auc(np.ones(5), np.arange(5)))


def test_logloss_matches_the_formula():
    labels = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 1.0, 0.0])
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    expected = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    assert logloss(labels, p) == pytest.approx(expected)
    logits = np.array([2.0, -1.0, 0.0])
    metrics = classification_metrics(np.array([1, 0, 1]), logits)
    assert metrics["logloss"] == pytest.approx(logloss(np.array([1, 0, 1]), 1 / (1 + np.exp(-logits))))


@pytest.fixture(scope="module")
def movielens(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    assert main(["prepare", "-c", "configs/movielens.yaml", f"prepare.inputs=[{shared_data / 'movielens-100k-recbole'}]",
                 f"prepare.output={data}", "prepare.progress=false"]) == 0
    return root


def test_train_cli_resume_and_plain_loader(movielens, capsys):
    out = movielens / "dnn"
    args = ["train", "-c", "configs/movielens.yaml", f"prepare.output={movielens / 'data'}", f"train.output={out}",
            "train.model.name=dnn", "train.model.mlp_layers=[64,32]", "train.epochs=1", "train.progress=false",
            "train.sharding.type=table_wise", "train.optim.embedding_lr=0.05"]
    assert main(args) == 0
    first = json.loads((out / "train.json").read_text())
    assert first["epochs_run"] == 1 and 0.5 < first["test"]["auc"] < 1
    assert first["sharding_plan"]["t_user_id"]["sharding_type"] == "table_wise"
    assert first["parameters"]["embedding"] > 0 and first["flops_per_example"] > 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("valid" in entry for entry in log)
    # The same command with more epochs resumes after the first one instead of starting over.
    assert main(args[:-4] + ["train.epochs=2", "train.progress=false", "train.sharding.type=table_wise",
                             "train.optim.embedding_lr=0.05"]) == 0
    second = json.loads((out / "train.json").read_text())
    assert second["epochs_run"] == 2 and second["history"][0] == first["history"][0]
    assert "resumed from" in capsys.readouterr().err
    # Any checkpoint becomes a plain state_dict in one process, without a process group.
    from recsys_kd.data.schema import Schema
    from recsys_kd.models.zoo import ModelConfig, build_model

    model = build_model(Schema.load(movielens / "data"), ModelConfig(name="dnn", mlp_layers=[64, 32]))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint.load_model_tensors(out / "checkpoints" / "best", state)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    model.eval()
    reader = ParquetReader(movielens / "data", "test", ReaderConfig(batch_size=100_000), rank=0, world_size=1)
    batch = next(iter(reader))
    with torch.no_grad():
        probabilities = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    assert auc(batch.labels.numpy(), probabilities) == pytest.approx(second["test"]["auc"], abs=1e-6)


def test_checkpoint_missing_a_rank_state_is_refused(movielens, tmp_path, capsys):
    """A checkpoint of 4 ranks (its rank_0.json says) that holds one rank's state cannot be resumed:
    the error names the missing rank (loaded unverified: verified, the changed file is damage)."""
    source = TrainOutput(movielens / "dnn")
    step = source.latest()
    state = json.loads((step / "rank_0.json").read_text())
    forged = tmp_path / "checkpoints"
    import shutil

    shutil.copytree(source.checkpoints, forged)
    (forged / step.name / "rank_0.json").write_text(json.dumps({**state, "world_size": 4}))
    code = main(["train", "-c", "configs/movielens.yaml", f"prepare.output={movielens / 'data'}", f"train.output={tmp_path}",
                 "train.model.name=dnn", "train.model.mlp_layers=[64,32]", "train.epochs=3", "train.progress=false",
                 "train.sharding.type=table_wise", "train.verify_checkpoints=false"])
    assert code == 2
    assert "no state for rank 1 of the 4 that wrote it (rank_1.json is missing)" in capsys.readouterr().err
