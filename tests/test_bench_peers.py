"""tools/bench_peers.py hands FuxiCTR the same data this project trains on: its export of a prepared
dataset holds the same rows, labels, ids and dense values, and its feature map the same tables."""

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_kd.data.schema import Schema
from recsys_kd.recipe import load_recipe
from tests.helpers import load_tool


def bench_peers():
    return load_tool("bench_peers")


@pytest.mark.multiprocess
def test_the_fuxictr_export_holds_the_same_rows_ids_and_tables(tiny_pipeline_run, tmp_path):
    config, _ = tiny_pipeline_run
    dataset = Path(load_recipe(config).prepare.output)
    schema = Schema.load(dataset)
    output = bench_peers().write_fuxictr_dataset(dataset, tmp_path / "fuxictr_tiny")

    feature_map = json.loads((output / "feature_map.json").read_text())
    specs = {name: spec for entry in feature_map["features"] for name, spec in entry.items()}
    assert feature_map["labels"] == [schema.label] and feature_map["dataset_id"] == output.name
    assert {name: spec["vocab_size"] for name, spec in specs.items() if spec["type"] == "categorical"} == {
        feature.name: feature.num_embeddings for feature in schema.sparse}
    assert [name for name, spec in specs.items() if spec["type"] == "numeric"] == list(schema.dense)
    assert all("padding_idx" not in spec for spec in specs.values())  # id 0 (missing) is trained, as here
    for split, info in schema.splits.items():
        ours = pa.concat_tables([pq.read_table(dataset / part) for part in info.files])
        theirs = pq.read_table(output / f"{split}.parquet")
        assert theirs.num_rows == ours.num_rows == info.rows
        for column in theirs.column_names:
            assert theirs[column].to_pylist() == ours[column].to_pylist(), (split, column)


def test_the_fuxictr_driver_is_valid_python_naming_the_package_layers():
    driver = bench_peers().FUXICTR_DRIVER
    imported = {alias.name for node in ast.walk(ast.parse(driver)) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {"FeatureMap", "RankDataLoader", "CrossNet", "FeatureEmbedding", "MLP_Block", "BaseModel"} <= imported
