"""The whole pipeline on a tiny recipe: every stage runs, the artifacts alone reproduce the training
side's test AUC, and a rerun skips every finished stage."""

import pytest

from recsys_kd.pipeline import artifact_rows, model_rows, run_pipeline
from recsys_kd.recipe import load_recipe
from recsys_kd.runs import TrainOutput


@pytest.mark.multiprocess
def test_tiny_pipeline_runs_every_stage_and_the_artifacts_agree(tiny_pipeline_run):
    config, record = tiny_pipeline_run
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
