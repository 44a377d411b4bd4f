"""The whole pipeline on a tiny recipe: every stage runs, the artifacts alone reproduce the training
side's test AUC, and a rerun skips every finished stage."""

from pathlib import Path

import pytest

from recsys_kd.pipeline import artifact_rows, model_rows, run_pipeline
from recsys_kd.recipe import load_recipe
from recsys_kd.runs import TrainOutput
from tests.helpers import TINY_MODEL
from tests.trainrun import write_recipe


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


def two_rank_recipe(root: Path) -> Path:
    """Generated rows dealt in chunks of 1000 and a sequential split: each rank's rows of each split
    are whole row groups of 200, so a 2-rank dataset has the 1-process row groups, and 2 ranks with
    per-rank batches of 200 read the 1-process batches of 400 (the same training, within float
    rounding)."""
    quick = {"epochs": 1, "max_steps": 6, "progress": False, "eval_batch_size": 2048,
             "sharding": {"type": "table_wise"}}  # the planner's choice depends on the world size
    return write_recipe(root / "ranks.yaml", {
        "run_dir": str(root / "run"),
        "prepare": {"format": "synthetic", "output": str(root / "run" / "data"), "progress": False,
                    "synthetic": {"rows": 4000, "seed": 3, "max_vocab": 200, "chunk_rows": 1000},
                    "split": {"method": "sequential"}, "row_group_rows": 200},
        "reader": {"batch_size": 400, "shuffle": False},
        "train": {"model": {"name": "deepfm", "mlp_layers": [16], **TINY_MODEL}, **quick},
        "infer": {"teachers": [{"name": "deepfm", "train_output": str(root / "run" / "train" / "deepfm")}],
                  "batch_size": 512},
        "distill": {"model": {"name": "dnn", "mlp_layers": [16, 16], **TINY_MODEL},
                    "distill": {"teachers": ["deepfm"], "loss": {"hard": 0.5, "mse": 1.0}}, **quick},
        "compress": {"methods": ["afm"], "batch_size": 1000, "steps": [{"what": "mlp", "ranks": {1: 4}}],
                     "finetune": {"epochs": 1}},
    })


@pytest.mark.slow  # ~60 s on the shared 2-core machine: two whole pipelines
@pytest.mark.multiprocess
def test_a_two_rank_pipeline_ends_with_the_one_process_tables(tmp_path):
    import json

    from recsys_kd.runs import PREPARE_RECORD
    from tests.helpers import read_all
    from tests.trainrun import run_stage

    one_root, two_root = tmp_path / "one", tmp_path / "two"
    one_root.mkdir()
    two_root.mkdir()
    one = run_pipeline(load_recipe(two_rank_recipe(one_root)))
    assert run_stage("pipeline", two_rank_recipe(two_root), 2, ["reader.batch_size=200"], timeout=600) == [0, 0]
    two = json.loads((two_root / "run" / "pipeline.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert set(two["stages"]) == set(one["stages"])
    prepared = json.loads((two_root / "run" / "data" / PREPARE_RECORD).read_text())
    assert prepared["world_size"] == 2 and all(rank["rows"] for rank in prepared["ranks"])
    assert read_all(two_root / "run" / "data").equals(read_all(one_root / "run" / "data"))  # exact
    assert two["stages"]["read_back"] == {
        split: {**counts, "seconds": two["stages"]["read_back"][split]["seconds"],
                "rows_per_second": two["stages"]["read_back"][split]["rows_per_second"]}
        for split, counts in one["stages"]["read_back"].items()}
    for table in (model_rows, artifact_rows):
        rows_one, rows_two = (sorted(table(record), key=lambda row: str(row.get("artifact"))) for record in (one, two))
        rows_one, rows_two = list(rows_one), list(rows_two)  # pipeline.json's stages are in key order
        assert len(rows_one) == len(rows_two) > 0
        for a, b in zip(rows_one, rows_two):
            for key, value in a.items():
                if key in ("test auc", "test logloss", "scored test auc"):
                    assert b[key] == pytest.approx(value, abs=5e-5), (a["stage" if "stage" in a else "artifact"], key)
                elif "/s" not in key and "latency" not in key and "parity" not in key and "MiB" not in key:
                    assert b[key] == value, key
    for role, scored in two["stages"]["score"].items():
        assert scored["world_size"] == 2 and scored["rows"] == one["stages"]["score"][role]["rows"]


def test_a_changed_stage_trains_again_from_the_start_and_so_does_every_stage_after_it(tmp_path):
    quick = {"epochs": 1, "max_steps": 4, "progress": False, "eval_batch_size": 2048}
    config = write_recipe(tmp_path / "stale.yaml", {
        "run_dir": str(tmp_path),
        "prepare": {"format": "synthetic", "output": str(tmp_path / "data"), "progress": False,
                    "synthetic": {"rows": 3000, "seed": 2, "max_vocab": 100}},
        "reader": {"batch_size": 256, "shuffle": True},
        "train": {"model": {"name": "dnn", "mlp_layers": [8], **TINY_MODEL}, **quick},
        "infer": {"teachers": [{"name": "dnn", "train_output": str(tmp_path / "train" / "dnn")}], "batch_size": 512},
        "distill": {"model": {"name": "dnn", "mlp_layers": [8, 8], **TINY_MODEL},
                    "distill": {"teachers": ["dnn"], "loss": {"hard": 0.5, "mse": 1.0}}, **quick},
        "finetune": {"model": {"name": "dnn", "mlp_layers": [8, 8], **TINY_MODEL}, **quick},
    })
    run_pipeline(load_recipe(config))
    student = TrainOutput(tmp_path / "distill" / "dnn")

    def evaluations_logged(output: TrainOutput) -> int:
        return sum('"valid"' in line for line in output.metrics_log.read_text().splitlines())

    # a distillation setting changed: the finished student is replaced (not resumed past its end), and
    # its FT, whose own config did not change, is redone from the new student
    changed = run_pipeline(load_recipe(config, ["distill.optim.lr=0.01"]))["stages"]
    assert changed["train"]["skipped"] and not changed["distill"]["skipped"] and not changed["finetune"]["skipped"]
    assert changed["distill"]["config"]["optim"]["lr"] == 0.01 and changed["distill"]["steps"] == quick["max_steps"]
    assert evaluations_logged(student) == len(student.record["history"])  # one run's log, not two
    assert student.record_path.stat().st_mtime <= TrainOutput(student.path / "ft").record_path.stat().st_mtime

    # a retrained teacher makes its soft labels, and everything read from them, stale
    retrained = run_pipeline(load_recipe(config, ["distill.optim.lr=0.01", "train.optim.lr=0.01"]))["stages"]
    assert not retrained["train"]["skipped"]
    assert retrained["infer"]["teachers"]["dnn"]["test"] == retrained["train"]["test"]
    assert not retrained["distill"]["skipped"] and not retrained["finetune"]["skipped"]

    again = run_pipeline(load_recipe(config, ["distill.optim.lr=0.01", "train.optim.lr=0.01"]))["stages"]
    assert all(again[name]["skipped"] for name in ("prepare", "train", "distill", "finetune"))
