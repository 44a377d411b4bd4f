"""The whole pipeline on a tiny recipe: every stage runs, the artifacts alone reproduce the training
side's test AUC, and a rerun skips every finished stage."""

from pathlib import Path

import pytest

from recsys_kd.pipeline import artifact_rows, model_rows, run_pipeline
from recsys_kd.recipe import load_recipe
from recsys_kd.runs import TrainOutput
from tests.trainrun import write_recipe

TINY = {"embedding_dim": 8, "dense_mode": "projected"}


def tiny_recipe(root: Path) -> Path:
    quick = {"epochs": 1, "max_steps": 8, "progress": False, "eval_batch_size": 2048}
    return write_recipe(root / "tiny.yaml", {
        "run_dir": str(root),
        "synthesize": {"path": str(root / "raw" / "train.txt"),
                       "synthetic": {"rows": 4000, "seed": 1, "max_vocab": 200, "chunk_rows": 2000}},
        "prepare": {"format": "criteo", "inputs": [str(root / "raw" / "train.txt")], "output": str(root / "data"),
                    "criteo": {"integers": "bucketize"}, "ids": {"rule": "vocab", "min_count": 2},
                    "progress": False, "row_group_rows": 500},
        "reader": {"batch_size": 256, "shuffle": True},
        "train": {"model": {"name": "dcn", "mlp_layers": [16], "cross_layers": 2, **TINY}, **quick},
        "infer": {"teachers": [{"name": "dcn", "train_output": str(root / "train" / "dcn")}], "batch_size": 512},
        "distill": {"model": {"name": "dnn", "mlp_layers": [16, 16, 16], **TINY},
                    "distill": {"teachers": ["dcn"], "loss": {"hard": 0.5, "mse": 1.0}}, **quick},
        "finetune": {"model": {"name": "dnn", "mlp_layers": [16, 16, 16], **TINY}, **quick},
        "compress": {"methods": ["afm"], "batch_size": 1000,
                     "steps": [{"what": "mlp", "ranks": {1: 4}}, {"what": "embeddings", "rank": 4}],
                     "finetune": {"epochs": 1}},
    })


@pytest.mark.multiprocess
def test_tiny_pipeline_runs_every_stage_and_the_artifacts_agree(tmp_path):
    config = tiny_recipe(tmp_path)
    record = run_pipeline(load_recipe(config))
    stages = record["stages"]
    assert list(stages) == ["synthesize", "prepare", "read_back", "train", "infer", "distill", "finetune",
                            "compress", "export", "score"]
    assert set(stages["export"]) == set(stages["score"]) == {"teacher", "student", "compressed"}

    compressed = stages["compress"]["chains"]["afm"][-1]
    assert compressed["stage"] == "embeddings fine-tuned"
    assert compressed["parameters"] < stages["finetune"]["parameters"]["total"]
    # each artifact, scored on its own, reproduces the test AUC the training side measured
    final = TrainOutput(stages["compress"]["final"]["afm"]).record
    expected = {"teacher": stages["train"]["test"]["auc"], "student": stages["finetune"]["test"]["auc"],
                "compressed": final["test"]["auc"]}
    for role, auc in expected.items():
        assert stages["score"][role]["rows"] == stages["train"]["test"]["rows"]
        scored = stages["score"][role]["metrics"]  # streaming AUC: exact within its stated bound
        assert scored["auc"] == pytest.approx(auc, abs=scored["auc_max_error"] + 1e-6), role
        assert stages["export"][role]["parity"]["max_abs_diff"] < 1e-5
    assert len(artifact_rows(record)) == 3 and len(model_rows(record)) == 3 + 2 * 2

    again = run_pipeline(load_recipe(config))["stages"]
    for name in ("synthesize", "prepare", "train", "distill", "finetune", "compress"):
        assert again[name]["skipped"], name
    assert all(entry["skipped"] for entry in again["export"].values())
    assert all(entry["skipped"] for entry in again["score"].values())
