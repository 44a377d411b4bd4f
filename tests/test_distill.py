"""Distillation through the trainer: pre-train (soft labels from infer) with a gate, frozen shared
embeddings, co-train, hint regression; the terms equal the tested kd_loss; the record holds teacher,
ensemble and student metrics."""

import json

import pytest
import torch
import yaml

from recsys_kd.cli import main
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.distill.config import DistillConfig
from recsys_kd.distill.losses import KDLossConfig, kd_loss
from recsys_kd.distill.task import DistillationTask
from recsys_kd.runs import TrainOutput


def test_kd_loss_distill_is_the_weighted_teacher_terms():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(64), torch.randn(64), torch.randint(0, 2, (64,)).float()
    terms = kd_loss(KDLossConfig(hard=0.3, soft=0.5, mse=2.0, temperature=2.0), student, labels, teacher)
    torch.testing.assert_close(terms["distill"], 0.5 * terms["soft"] + 2.0 * terms["mse"])
    torch.testing.assert_close(terms["total"], 0.3 * terms["hard"] + terms["distill"])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    synthetic = SyntheticConfig(rows=4000, seed=4, sparse_features=5, dense_features=0, max_vocab=200, chunk_rows=1000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=500))
    recipe = {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 256, "shuffle": True},
        "train": {"model": {"name": "dcn", "embedding_dim": 8, "mlp_layers": [16]}, "epochs": 1, "progress": False,
                  "sharding": {"type": "table_wise"}},
        "infer": {"teachers": [{"name": "dcn", "train_output": str(root / "train" / "dcn")},
                               {"name": "fm", "train_output": str(root / "train" / "fm")}], "progress": False,
                  "hints": True},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for model in ("dcn", "fm"):
        assert main(["train", "-c", str(root / "recipe.yaml"), f"train.model.name={model}"]) == 0
    assert main(["infer", "-c", str(root / "recipe.yaml")]) == 0
    return root


def distill(root, name, distill_section, **student):
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    recipe["distill"] = {"model": {"name": "dagfm_outer", "embedding_dim": 8}, "output": str(root / name),
                         "epochs": 2, "progress": False, "sharding": {"type": "table_wise"},
                         "distill": distill_section, **student}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["distill", "-c", str(path)]) == 0
    return json.loads((root / name / "train.json").read_text())


def test_kd_loss_adds_the_weighted_hint_term():
    torch.manual_seed(0)
    student, teacher, labels, hint = torch.randn(32), torch.randn(32), torch.randint(0, 2, (32,)).float(), torch.rand(())
    config = KDLossConfig(hard=1.0, soft=0.5, hint=1e-3)
    terms = kd_loss(config, student, labels, teacher, hint)
    torch.testing.assert_close(terms["distill"], 0.5 * terms["soft"] + 1e-3 * hint)
    torch.testing.assert_close(terms["total"], terms["hard"] + terms["distill"])
    with pytest.raises(ValueError, match="hint"):
        kd_loss(config, student, labels, teacher)


def test_hint_term_without_hint_columns_names_the_manifest(tmp_path):
    from recsys_kd.data.schema import SchemaError
    from recsys_kd.distill.config import hint_widths

    (tmp_path / "side.json").write_text(json.dumps({"columns": ["teacher_dcn"], "splits": {}}))
    config = DistillConfig(soft_labels=str(tmp_path), teachers=["dcn"], loss=KDLossConfig(hard=1.0, hint=1e-3))
    with pytest.raises(SchemaError, match=r"side.json: no hint column 'hint_dcn'.*infer.hints=true"):
        hint_widths(config)
    (tmp_path / "side.json").write_text(json.dumps({"columns": ["teacher_dcn"], "vectors": {"hint_dcn": 24}}))
    assert hint_widths(config) == {"dcn": 24}
    assert config.columns == ["teacher_dcn", "hint_dcn"]


def test_gated_ensemble_distillation_with_distill_loss_early_stopping(root):
    record = distill(root, "gated", {"teachers": ["dcn", "fm"], "aggregation": "gate",
                                     "loss": {"hard": 0.5, "soft": 0.5, "temperature": 2.0}},
                     monitor="distill_loss")
    assert record["history"] and all("distill_loss" in h["valid"] for h in record["history"])
    assert record["best_valid"] == min(h["valid"]["distill_loss"] for h in record["history"])
    assert 0.5 < record["test"]["auc"] < 1
    # The record holds every teacher (scored from its soft labels, which are its best checkpoint's
    # logits, so its test metrics are the ones its training recorded), the gated ensemble and the student.
    distilled = record["distillation"]
    infer_record = json.loads((root / "soft_labels" / "infer.json").read_text())
    for name in ("dcn", "fm"):
        teacher = distilled["teachers"][name]
        trained = json.loads((root / "train" / name / "train.json").read_text())
        assert teacher["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-6)
        assert teacher["test"]["logloss"] == pytest.approx(trained["test"]["logloss"], abs=1e-5)
        assert teacher["valid"]["rows"] == trained["history"][0]["valid"]["rows"]
        assert teacher["parameters"] == infer_record["teachers"][name]["parameters"]
        assert teacher["flops_per_example"] == infer_record["teachers"][name]["flops_per_example"]
    ensemble = distilled["ensemble"]
    assert ensemble["parameters"]["total"] == sum(t["parameters"]["total"] for t in distilled["teachers"].values())
    assert 0.5 < ensemble["test"]["auc"] < 1 and 0.5 < ensemble["valid"]["auc"] < 1
    assert distilled["student"]["test"] == record["test"] and distilled["student"]["parameters"] == record["parameters"]
    assert distilled["student"]["valid"]["distill_loss"] == pytest.approx(record["best_valid"], rel=1e-6)
    path = TrainOutput(root / "gated").latest()
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert "model.gate.w" in stored and "model.gate.b" in stored
    state = {"model": {"gate.w": torch.zeros(2), "gate.b": torch.zeros(2)}}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    assert state["model"]["gate.w"].abs().sum() > 0  # starts at 0 (plain mean), then learns


def test_kd_dagfm_shared_frozen_embeddings_then_fine_tune(root):
    teacher_best = root / "train" / "dcn" / "checkpoints" / "best"
    record = distill(root, "shared", {"teachers": ["dcn"], "loss": {"hard": 0.1, "mse": 1.0}},
                     init_from=str(teacher_best), init_from_part="embeddings", freeze_embeddings=True)
    assert record["test"]["auc"] > 0.5
    import torch.distributed.checkpoint as dcp

    key = "model.model.embedding.ebc.embedding_bags.t_C1.weight"
    stored = dcp.FileSystemReader(str(teacher_best)).read_metadata().state_dict_metadata[key]
    teacher_table = {key: torch.zeros(tuple(stored.size))}
    student_table = {key: torch.zeros(tuple(stored.size))}
    dcp.load(teacher_table, checkpoint_id=str(teacher_best), no_dist=True)
    dcp.load(student_table, checkpoint_id=str(TrainOutput(root / "shared").latest()), no_dist=True)
    torch.testing.assert_close(student_table[key], teacher_table[key])  # shared and frozen


def test_cotrain_teacher_is_trained_by_its_labels_only(root):
    record = distill(root, "cotrain", {"scheme": "cotrain", "cotrain_teacher": {"name": "dnn", "embedding_dim": 8,
                                                                                 "mlp_layers": [16]},
                                       "loss": {"hard": 0.5, "soft": 0.5}})
    assert record["test"]["auc"] > 0.5 and record["steps"] > 0
    # the co-trained teacher is the ensemble, scored by its own logits
    distilled = record["distillation"]
    assert distilled["teachers"]["cotrain"]["model"] == "dnn"
    assert distilled["teachers"]["cotrain"]["test"] == distilled["ensemble"]["test"]
    assert distilled["teachers"]["cotrain"]["test"]["auc"] > 0.5


def test_hint_regression_from_infer_hints_trains_the_projection(root):
    # the hint term dominates the loss here, so it has to fall as the student and projection learn
    record = distill(root, "hint", {"teachers": ["dcn"], "loss": {"hard": 0.1, "hint": 1.0}}, monitor="distill_loss")
    hint_losses = [h["valid"]["distill_loss"] for h in record["history"]]
    assert all(value > 0 for value in hint_losses) and hint_losses[-1] < hint_losses[0]
    import torch.distributed.checkpoint as dcp

    path = TrainOutput(root / "hint").latest()
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    key = "model.projections.dcn.weight"
    assert tuple(stored[key].size) == (record_hidden_dim(root, "dagfm_outer"), record_hidden_dim(root, "dcn"))


def record_hidden_dim(root, name):
    from recsys_kd.data.schema import Schema
    from recsys_kd.models.zoo import ModelConfig, build_model

    return build_model(Schema.load(root / "data"), ModelConfig(name=name, embedding_dim=8, mlp_layers=[16])).hidden_dim


def test_hint_loss_trains_projection_and_student_never_the_hint_inputs(root):
    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import Schema
    from recsys_kd.models.zoo import ModelConfig, build_model

    schema = Schema.load(root / "data")
    student = build_model(schema, ModelConfig(name="dnn", embedding_dim=8, mlp_layers=[8]))
    batch = next(iter(ParquetReader(root / "data", "train", ReaderConfig(batch_size=64, extras=["teacher_dcn", "hint_dcn"]),
                                    rank=0, world_size=1, side_inputs=[root / "soft_labels"])))
    # pre-train: the hint comes from infer's column; a gradient must not flow into it
    projection = torch.nn.Linear(batch.extras["hint_dcn"].shape[1], student.hidden_dim, bias=False)
    task = DistillationTask(student, DistillConfig(teachers=["dcn"], loss=KDLossConfig(hard=0.0, hint=1.0)),
                            projections={"dcn": projection})
    batch.extras["hint_dcn"].requires_grad_(True)
    loss, outputs = task(batch)
    loss.backward()
    assert batch.extras["hint_dcn"].grad is None
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    torch.testing.assert_close(loss.detach(), outputs.losses["distill"])  # the hint term alone


def test_cotrained_teacher_learns_from_its_labels_only(root):
    """Every distillation term (soft, MSE, hint) reaches the student and never the co-trained teacher:
    the teacher's gradient is that of its own label loss alone."""
    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import Schema
    from recsys_kd.models.zoo import ModelConfig, build_model

    schema = Schema.load(root / "data")
    torch.manual_seed(0)
    teacher = build_model(schema, ModelConfig(name="dcn", embedding_dim=8, mlp_layers=[16]))
    student = build_model(schema, ModelConfig(name="dnn", embedding_dim=8, mlp_layers=[8]))
    config = DistillConfig(scheme="cotrain", cotrain_teacher={"name": "dcn"}, loss=KDLossConfig(hard=0.5, soft=0.5, mse=1.0, hint=1.0))
    task = DistillationTask(student, config, teacher=teacher,
                            projections={"cotrain": torch.nn.Linear(teacher.hidden_dim, student.hidden_dim, bias=False)})
    batch = next(iter(ParquetReader(root / "data", "train", ReaderConfig(batch_size=64), rank=0, world_size=1)))
    loss, outputs = task(batch)
    loss.backward()
    assert outputs.losses["distill"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert task.projections["cotrain"].weight.grad.abs().sum() > 0
    from_kd_and_labels = {name: p.grad.clone() for name, p in teacher.named_parameters() if p.grad is not None}
    teacher.zero_grad()
    own, _, _ = teacher.forward_with_hidden(batch.dense, batch.sparse)
    torch.nn.functional.binary_cross_entropy_with_logits(own, batch.labels).backward()
    from_labels = {name: p.grad for name, p in teacher.named_parameters() if p.grad is not None}
    assert from_kd_and_labels.keys() == from_labels.keys() and from_labels
    for name, grad in from_labels.items():
        torch.testing.assert_close(from_kd_and_labels[name], grad)
