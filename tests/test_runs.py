"""TrainOutput, the one reader of a model-producing stage's output, and the task modules' contract."""

import json

import pytest
import torch
import torch.nn.functional as F

from recsys_kd.config import ConfigError
from recsys_kd.distill.config import DistillConfig, StudentConfig
from recsys_kd.runs import COMPRESS_STEP_RECORD, TRAIN_RECORD, OutputError, TrainOutput, export_record
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.task import LabelTask, TaskOutputs, embedding_l2
from tests.helpers import tiny_batch, tiny_schema


def write_checkpoint(path):
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")


def test_a_missing_record_names_the_directory_and_what_makes_one(tmp_path):
    output = TrainOutput(tmp_path / "nothing")
    assert not output.finished()
    with pytest.raises(OutputError, match=r"nothing/train.json not found; is .*nothing the output of train"):
        output.record
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / TRAIN_RECORD).write_text("{")
    with pytest.raises(OutputError, match=r"broken/train.json: not valid JSON"):
        TrainOutput(tmp_path / "broken").record


def test_record_fields_and_checkpoints_by_name(tmp_path):
    (tmp_path / TRAIN_RECORD).write_text(json.dumps({
        "model": "dnn", "dataset": "/data/x", "test": {"auc": 0.7},
        "config": {"model": {"name": "dnn"}, "epochs": 3}}))
    output = TrainOutput(tmp_path)
    assert output.finished() and output.model_name == "dnn" and str(output.dataset) == "/data/x"
    assert output.model_config == {"name": "dnn"} and output.test_metrics == {"auc": 0.7}
    with pytest.raises(OutputError, match=r"checkpoints/best: not a checkpoint .*known: none"):
        output.checkpoint()
    write_checkpoint(output.best)
    write_checkpoint(output.checkpoints / "step_000000010")
    assert output.checkpoint() == output.best
    assert output.latest() is None
    with pytest.raises(OutputError, match="no 'latest' pointer"):
        output.checkpoint("latest")
    (output.checkpoints / "latest").write_text("step_000000010\n")
    assert output.checkpoint("latest") == output.checkpoints / "step_000000010"
    assert output.checkpoint(str(output.best)) == output.best  # a path
    with pytest.raises(OutputError, match=r"step_9: not a checkpoint .*known: best, step_000000010"):
        output.checkpoint("step_9")
    (output.checkpoints / "latest").write_text("step_000000020\n")
    with pytest.raises(OutputError, match="names step_000000020, which is missing or incomplete"):
        output.latest()


def test_a_compress_step_is_read_like_a_train_output(tmp_path):
    (tmp_path / COMPRESS_STEP_RECORD).write_text(json.dumps({"model": "dcn", "config": {"model": {"name": "dcn"}}}))
    output = TrainOutput(tmp_path)
    assert output.finished() and output.record_path.name == COMPRESS_STEP_RECORD and output.model_name == "dcn"


def test_export_record_sits_beside_the_artifact(tmp_path):
    assert export_record(tmp_path / "model.pt") == tmp_path / "model.pt.export.json"


def test_train_config_of_a_student_output_is_its_training_part(tmp_path):
    student = StudentConfig(epochs=4, distill=DistillConfig(teachers=["dcn"]))
    from recsys_kd.config import to_dict

    (tmp_path / TRAIN_RECORD).write_text(json.dumps({"config": to_dict(student)}))
    base = TrainConfig.of(TrainOutput(tmp_path))
    assert type(base) is TrainConfig and base.epochs == 4
    assert StudentConfig.of(TrainOutput(tmp_path)).distill.teachers == ["dcn"]
    (tmp_path / TRAIN_RECORD).write_text(json.dumps({"config": {"epochs": "four"}}))
    with pytest.raises(ConfigError, match=r"train.json: config.epochs: expected an integer"):
        TrainConfig.of(TrainOutput(tmp_path))


def test_label_task_is_bce_plus_l2_on_the_looked_up_rows():
    from recsys_kd.models import ModelConfig, build_model

    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, ModelConfig(name="dnn", embedding_dim=4, mlp_layers=[8]))
    batch = tiny_batch(schema, seed=1, batch_size=16)
    loss, outputs = LabelTask(model, l2_embedding=0.01)(batch)
    assert isinstance(outputs, TaskOutputs) and outputs.losses == {} and outputs.predictors == {}
    with torch.no_grad():
        logits, _, fields = model.forward_with_hidden(batch.dense, batch.sparse)
    torch.testing.assert_close(outputs.logits.detach(), logits)
    squares = sum(float(value) ** 2 for example in fields.tolist() for field in example for value in field)
    direct = float(F.binary_cross_entropy_with_logits(logits, batch.labels)) + 0.01 * squares / 16
    assert loss.item() == pytest.approx(direct, rel=1e-5)
    assert embedding_l2(torch.zeros(0, 3, 4), 1.0) == 0


@pytest.mark.parametrize("task_kind", ["label", "distill"])
def test_a_padded_batch_has_the_loss_outputs_and_gradients_of_its_real_rows(task_kind):
    """Ranks pad a short last batch to the common size (gloo all-gathers equal sizes only); the padding
    rows must change nothing: same loss, outputs and gradients as the batch itself."""
    from recsys_kd.distill.losses import KDLossConfig
    from recsys_kd.distill.task import DistillationTask
    from recsys_kd.models import ModelConfig, build_model

    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(schema, ModelConfig(name="dnn", embedding_dim=4, mlp_layers=[8]))
    batch = tiny_batch(schema, seed=2, batch_size=11)
    batch.extras = {"teacher_t": torch.randn(11)}
    if task_kind == "label":
        task = LabelTask(model, l2_embedding=0.01)
    else:
        task = DistillationTask(model, DistillConfig(teachers=["t"], loss=KDLossConfig(hard=0.5, soft=0.5, mse=1.0)),
                                l2_embedding=0.01)
    padded = batch.padded_to(16)
    assert padded.batch_size == 16 and padded.rows == 11 and padded.row_ids[11:].eq(-1).all()
    assert padded.sparse.stride() == 16 and padded.sparse.to_dict()["tags"].lengths()[:11].tolist() == \
        batch.sparse.to_dict()["tags"].lengths().tolist()

    def run(b):
        model.zero_grad()
        loss, outputs = task(b)
        loss.backward()
        return loss.detach(), outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, outputs, grads), (loss_p, outputs_p, grads_p) = run(batch), run(padded)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(outputs_p.logits, outputs.logits)
    assert outputs_p.losses.keys() == outputs.losses.keys() and outputs_p.predictors.keys() == outputs.predictors.keys()
    for name in outputs.predictors:
        torch.testing.assert_close(outputs_p.predictors[name], outputs.predictors[name])
    assert grads_p.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_p[name], grad, msg=name)
