"""Teacher-ensemble inference: values (logits and hint vectors), alignment, 2 processes == 1 process,
kill and rerun."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema, SchemaError
from recsys_kd.data.side_inputs import verify_alignment
from tests.trainrun import run_stage, train_on_synthetic, write_recipe

pytestmark = pytest.mark.multiprocess

TEACHERS = {"dcn": {"name": "dcn", "embedding_dim": 8, "mlp_layers": [16]},
            "fm": {"name": "fm", "embedding_dim": 8}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return train_on_synthetic(tmp_path_factory.mktemp("infer"), TEACHERS, rows=5000, seed=3, max_steps=6)


def infer_recipe(root, name, hints=False):
    return write_recipe(root / f"{name}.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "infer": {"teachers": [{"name": n, "train_output": str(root / n)} for n in TEACHERS],
                  "output": str(root / name), "batch_size": 128, "progress": False,
                  "sharding": {"type": "row_wise"}, "hints": hints},
    })


def direct_outputs(root, teacher, split):
    """The teacher's logits and hidden vectors computed directly: plain model, best checkpoint, one
    process. Returns row_id -> (logit, hidden [H])."""
    from recsys_kd.models.zoo import ModelConfig, build_model
    from recsys_kd.train import checkpoint

    schema = Schema.load(root / "data")
    model = build_model(schema, ModelConfig(**TEACHERS[teacher]))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint.load_model_tensors(root / teacher / "checkpoints" / "best", state)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    model.eval()
    reader = ParquetReader(root / "data", split, ReaderConfig(batch_size=100_000), rank=0, world_size=1)
    batch = next(iter(reader))
    with torch.no_grad():
        logits, hidden, _ = model.forward_with_hidden(batch.dense, batch.sparse)
    return {r: (logit, vector) for r, logit, vector in zip(batch.row_ids.tolist(), logits.tolist(), hidden.numpy())}


def read_side(path, split):
    schema = Schema.load(path.parent / "data")
    return [pq.read_table(path / f) for f in schema.split(split).files]


def test_one_and_two_processes_write_identical_aligned_soft_labels(setup):
    root = setup
    assert run_stage("infer", infer_recipe(root, "soft1", hints=True), 1) == [0]
    assert run_stage("infer", infer_recipe(root, "soft2", hints=True), 2) == [0, 0]
    assert verify_alignment(root / "data", root / "soft1") == verify_alignment(root / "data", root / "soft2")
    schema = Schema.load(root / "data")
    for split in ("train", "valid", "test"):
        one, two = read_side(root / "soft1", split), read_side(root / "soft2", split)
        for a, b, relative in zip(one, two, schema.split(split).files):
            data_part = pq.ParquetFile(root / "data" / relative)
            assert a.num_rows == data_part.metadata.num_rows
            assert [pq.ParquetFile(root / "soft1" / relative).metadata.row_group(i).num_rows
                    for i in range(data_part.num_row_groups)] == [data_part.metadata.row_group(i).num_rows
                                                                  for i in range(data_part.num_row_groups)]
            assert a["row_id"].equals(pq.read_table(root / "data" / relative, columns=["row_id"])["row_id"])
            for column in ("teacher_dcn", "teacher_fm"):
                np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-5, atol=1e-6)
            for column in ("hint_dcn", "hint_fm"):
                np.testing.assert_allclose(np.stack(a[column].to_numpy(zero_copy_only=False)),
                                           np.stack(b[column].to_numpy(zero_copy_only=False)), rtol=1e-5, atol=1e-6)
    expected = direct_outputs(root, "dcn", "test")
    tables = read_side(root / "soft1", "test")
    got = {r: v for t in tables for r, v in zip(t["row_id"].to_pylist(), t["teacher_dcn"].to_pylist())}
    got_hints = {r: v for t in tables for r, v in zip(t["row_id"].to_pylist(), t["hint_dcn"].to_pylist())}
    assert got.keys() == expected.keys() == got_hints.keys()
    np.testing.assert_allclose([got[k] for k in expected], [v[0] for v in expected.values()], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array([got_hints[k] for k in expected]), np.stack([v[1] for v in expected.values()]),
                               rtol=1e-5, atol=1e-5)
    manifest = json.loads((root / "soft1" / "side.json").read_text())
    assert manifest["vectors"]["hint_dcn"] == len(next(iter(expected.values()))[1])
    # The reader joins the soft labels to the logs as extras, row for row: logits [B], hints [B, H]
    # (shuffled, so rows move between windows and batches together with their vectors).
    reader = ParquetReader(root / "data", "train",
                           ReaderConfig(batch_size=512, shuffle=True, extras=["teacher_fm", "hint_dcn"]),
                           rank=0, world_size=1, side_inputs=[root / "soft1"])
    batches = list(reader)
    width = manifest["vectors"]["hint_dcn"]
    assert all(b.extras["hint_dcn"].shape == (b.batch_size, width) for b in batches)
    joined = {r: v for b in batches for r, v in zip(b.row_ids.tolist(), b.extras["teacher_fm"].tolist())}
    joined_hints = {r: v for b in batches for r, v in zip(b.row_ids.tolist(), b.extras["hint_dcn"].tolist())}
    train_tables = read_side(root / "soft1", "train")
    side = {r: v for t in train_tables for r, v in zip(t["row_id"].to_pylist(), t["teacher_fm"].to_pylist())}
    side_hints = {r: v for t in train_tables for r, v in zip(t["row_id"].to_pylist(), t["hint_dcn"].to_pylist())}
    assert joined == pytest.approx(side)
    assert joined_hints.keys() == side_hints.keys()
    np.testing.assert_array_equal(np.array([joined_hints[r] for r in side_hints], np.float32),
                                  np.array(list(side_hints.values()), np.float32))


def test_killed_infer_rerun_completes_without_loss_or_duplicates(setup):
    root = setup
    config = infer_recipe(root, "soft_killed")
    codes = run_stage("infer", config, 2, fault="infer_part=1:2")
    assert codes[1] == -9
    with pytest.raises(SchemaError, match="missing or incomplete"):
        verify_alignment(root / "data", root / "soft_killed")
    done_before = sorted(p.name for p in (root / "soft_killed" / "train").glob("*.parquet"))
    assert run_stage("infer", config, 2) == [0, 0]
    rows = verify_alignment(root / "data", root / "soft_killed")
    schema = Schema.load(root / "data")
    assert rows == {s: schema.split(s).rows for s in ("train", "valid", "test")}
    all_ids = [i for s in ("train", "valid", "test") for t in read_side(root / "soft_killed", s) for i in t["row_id"].to_pylist()]
    assert len(all_ids) == len(set(all_ids)) == sum(rows.values())
    assert not [p for p in (root / "soft_killed").rglob(".*tmp")]
    record = json.loads((root / "soft_killed" / "infer.json").read_text())
    assert record["rows_scored_this_run"] < sum(rows.values())  # the finished parts were not redone
    assert done_before
