"""One id-rule applier for prepare and score: raw rows of each real sample (Criteo, Avazu, MovieLens)
scored through an exported artifact's raw-log path reach the model with exactly the ids (and dense
values) prepare gave them; IdRules on multi-hot lists, reserved ids and vocabulary errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_kd.data.criteo import CriteoOptions
from recsys_kd.data.id_rules import IdRules, feature_salt
from recsys_kd.data.ids import hash_ids, vocab_ids
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.schema import MISSING_ID, OOV_ID, IdRule, Schema, SchemaError, SparseFeature
from recsys_kd.export import artifact as artifact_module
from recsys_kd.export import export_artifact
from recsys_kd.export import score as score_module
from tests.helpers import fake_train_output, read_all

pytestmark = pytest.mark.usefixtures("one_thread")

# format -> (raw input under the shared data, prepare options, reserved ids the served rows must include:
# vocabularies with a min_count make OOV ids; the Criteo sample has missing values, the others none)
FORMATS: Dict[str, Tuple[str, Dict[str, Any], Set[int]]] = {
    "criteo": ("criteo-kaggle-sample/criteo_kaggle_union.txt",
               {"criteo": CriteoOptions(integers="bucketize"), "ids": IdConfig(rule="vocab", min_count=2)},
               {MISSING_ID, OOV_ID}),
    "avazu": ("avazu-sample/avazu_union.csv", {"ids": IdConfig(rule="hash", num_embeddings=1000, seed=5)}, set()),
    "movielens": ("movielens-100k-recbole", {"ids": IdConfig(rule="vocab", min_count=3)}, {OOV_ID}),
}


class _RecordingModule:
    """Wraps an artifact's module, keeping every input it is given."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self.inputs: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self.inputs.append((dense.clone(), ids.clone(), offsets.clone()))
        return self.module(dense, ids, offsets)


@pytest.mark.parametrize("raw_format", list(FORMATS))
def test_raw_rows_scored_through_an_artifact_get_the_ids_prepare_gave_them(
    raw_format: str, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative, options, reserved = FORMATS[raw_format]
    raw = shared_data / relative
    dataset = tmp_path / "data"
    prepare(PrepareConfig(format=raw_format, inputs=[str(raw)], output=str(dataset), progress=False, **options))
    artifact = tmp_path / "lr.pt"
    export_artifact(fake_train_output(tmp_path / "train", dataset, "lr"), artifact, parity_rows=16)

    recorders: List[_RecordingModule] = []

    def load_recording(path, **options):
        module, metadata = artifact_module.load_artifact(path, **options)
        recorders.append(_RecordingModule(module))
        return recorders[-1], metadata

    monkeypatch.setattr(score_module, "load_artifact", load_recording)
    record = score_module.score_dataset(artifact, raw, tmp_path / "scores", vocab_dir=dataset, batch_size=1000,
                                        progress=False)
    assert record["input"]["kind"] == "raw" and record["input"]["format"] == raw_format

    schema = Schema.load(dataset)
    inputs = recorders[0].inputs
    rows = sum(dense.shape[0] for dense, _, _ in inputs)
    assert rows == record["rows"]
    for dense, ids, offsets in inputs:  # single-valued features: one id per (row, feature), row-major
        assert offsets.tolist() == list(range(dense.shape[0] * len(schema.sparse) + 1))
    served_ids = torch.cat([ids for _, ids, _ in inputs]).numpy().reshape(rows, len(schema.sparse))
    served_dense = torch.cat([dense for dense, _, _ in inputs]).numpy()
    served_rows = pa.concat_tables([pq.read_table(part["path"]) for part in record["parts"]]).column("row_id").to_numpy()

    prepared = read_all(dataset)  # every split, by row_id
    assert np.array_equal(np.sort(served_rows), prepared.column("row_id").to_numpy())  # the same rows refused
    position = np.searchsorted(prepared.column("row_id").to_numpy(), served_rows)
    prepared_ids = np.stack([prepared.column(name).to_numpy()[position] for name in schema.sparse_names], axis=1)
    np.testing.assert_array_equal(served_ids, prepared_ids)
    for j, name in enumerate(schema.dense):
        np.testing.assert_array_equal(served_dense[:, j], prepared.column(name).to_numpy()[position])
    assert reserved <= set(np.unique(served_ids).tolist())


def _rules_schema() -> Schema:
    hashed = IdRule(kind="hash", seed=11 + feature_salt("tags"))
    return Schema(name="t", label="label", dense=["d"], extra=["e"], sparse=[
        SparseFeature("user", 7, IdRule(kind="identity")),
        SparseFeature("tags", 50, hashed, multi_hot=True),
        SparseFeature("genres", 5, IdRule(kind="vocab", vocab_file="vocab/genres.parquet"), multi_hot=True),
        SparseFeature("city", 5, IdRule(kind="vocab", vocab_file="vocab/city.parquet")),
    ])


def _raw_table() -> pa.Table:
    return pa.table({
        "row_id": pa.array([3, 4, 9], pa.int64()),
        "label": pa.array([1, 0, 1], pa.int8()),
        "d": pa.array([0.5, 1.0, 2.0], pa.float64()),
        "user": pa.array([1, 6, 0], pa.int32()),
        "tags": pa.array([["a", "b"], [], ["a", None]], pa.list_(pa.string())),
        "genres": pa.array([["x"], ["y", "q"], [None]], pa.list_(pa.string())),
        "city": pa.array(["p", None, "zz"], pa.string()),
        "e": pa.array([0.1, 0.2, 0.3], pa.float64()),
    })


def test_id_rules_multi_hot_lists_and_reserved_ids() -> None:
    schema = _rules_schema()
    vocabularies = {"genres": pa.array(["x", "y", "z"]), "city": pa.array(["p", "q", "r"])}
    table = IdRules(schema, vocabularies).apply(_raw_table())
    assert table.column_names == ["row_id", "label", "d", "user", "tags", "genres", "city", "e"]
    assert table.schema.field("label").type == pa.float32() and table.schema.field("e").type == pa.float32()
    assert table.column("user").to_pylist() == [1, 6, 0]
    tag_ids = hash_ids(pa.array(["a", "b", "a", None]), 50, 11 + feature_salt("tags")).tolist()
    assert table.column("tags").to_pylist() == [tag_ids[:2], [], tag_ids[2:]]
    assert tag_ids[0] == tag_ids[2] >= 2 and tag_ids[3] == MISSING_ID
    assert table.column("genres").to_pylist() == [[2], [3, OOV_ID], [MISSING_ID]]
    assert table.column("city").to_pylist() == [2, MISSING_ID, OOV_ID]
    assert vocab_ids(pa.array(["r"]), vocabularies["city"]).tolist() == [4]


def test_id_rules_load_vocabularies_and_refuse_wrong_ones(tmp_path: Path) -> None:
    schema = _rules_schema()
    with pytest.raises(SchemaError, match=r"features \['genres', 'city'\] have vocabulary ids"):
        IdRules(schema)
    with pytest.raises(SchemaError, match="vocabulary of feature 'genres' not found"):
        IdRules.load(schema, tmp_path)
    with pytest.raises(SchemaError, match="the prepared dataset holding its vocabulary is needed"):
        IdRules.load(schema, None)
    (tmp_path / "vocab").mkdir()
    for name, values in (("genres", ["x", "y", "z"]), ("city", ["p", "q", "r"])):
        pq.write_table(pa.table({"value": values, "id": [2, 3, 4]}), tmp_path / "vocab" / f"{name}.parquet")
    assert IdRules.load(schema, tmp_path).apply(_raw_table()).column("city").to_pylist() == [2, MISSING_ID, OOV_ID]
    pq.write_table(pa.table({"value": ["p", "q"], "id": [2, 3]}), tmp_path / "vocab" / "city.parquet")
    with pytest.raises(SchemaError, match="2 values, but the table for 'city' has 3 vocabulary rows"):
        IdRules.load(schema, tmp_path)
    hashed_only = schema.replace(sparse=schema.sparse[:2])
    assert IdRules.load(hashed_only, None).apply(_raw_table()).column_names[-1] == "e"
