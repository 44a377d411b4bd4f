"""Weighted sparse features (libSVM/libFM ``index:value``): the converter keeps the values, the reader hands
them out as KeyedJaggedTensor weights, the tables pool sum(value * row), and every stage (train, infer,
distill, compress, export, score; 2 ranks) uses them. Checked against direct computations."""

import json
import math
import pickle
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.data.batch import padding_batch
from recsys_kd.data.libsvm import LibSVMOptions, LibSVMSource
from recsys_kd.data.loader import ResumableLoader
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema, SparseFeature
from recsys_kd.models.embedding import FieldEmbedding, FirstOrder
from tests.helpers import IDENTITY, read_all
from tests.trainrun import final_weights, run_ranks, write_recipe

FEATURES = 6


def higgs_like_lines(rows, seed=0):
    """libSVM lines whose label depends only on the values of features 1..6, present on every line
    (as in HIGGS): without the values every row looks the same."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        x = rng.normal(size=FEATURES)
        label = "+1" if x[0] + x[1] - x[2] > 0 else "-1"
        lines.append(" ".join([label, *(f"{j + 1}:{x[j]:.5f}" for j in range(FEATURES))]))
    return lines


def parse_svm(line):
    """(indices, values) of a libSVM line, values as float32, zeros dropped."""
    pairs = [token.split(":") for token in line.split("#")[0].split()[1:]]
    kept = [(int(i), np.float32(float(v))) for i, v in pairs if float(v) != 0]
    return [i for i, _ in kept], [v for _, v in kept]


def source_table(path, options, quarantine=None):
    source = LibSVMSource([path], options)
    return source, pa.concat_tables([chunk.table for chunk in source.chunks(quarantine)])


# --- the converter ----------------------------------------------------------------------------------


def test_libsvm_values_are_kept_aligned_with_their_indices_and_truncated_with_them(tmp_path):
    rng = random.Random(3)
    lines = []
    for _ in range(200):
        count = rng.randint(0, 7)
        tokens = [f"{rng.randint(1, 50)}:{rng.choice([0, 1, round(rng.uniform(-3, 3), 4), 1e-3])}" for _ in range(count)]
        lines.append(" ".join([rng.choice(["+1", "-1"]), *tokens]))
    lines.append("+1 4:2.5 5:1e39")  # finite as a number, not as float32: refused in weight mode only
    (tmp_path / "a.svm").write_text("\n".join(lines) + "\n")
    quarantine = Quarantine(tmp_path / "q.jsonl")
    source, weighted = source_table(tmp_path / "a.svm", LibSVMOptions(max_length=3), quarantine)
    quarantine.close()
    assert source.info.weighted == ["features"]
    assert [json.loads(line)["reason"] for line in (tmp_path / "q.jsonl").read_text().splitlines()] == ["bad_feature"]
    table = weighted.to_pydict()
    assert table["row_id"] == list(range(len(lines) - 1))
    for row_id, ids, weights in zip(table["row_id"], table["features"], table["features__weight"]):
        indices, values = parse_svm(lines[row_id])
        assert ids == indices[:3] and weights == values[:3]  # float32 values, as the spec's value

    _, presence = source_table(tmp_path / "a.svm", LibSVMOptions(max_length=3, values="presence"))
    assert presence.column_names == ["row_id", "label", "features"]  # today's output, the values not stored
    kept = presence.slice(0, len(lines) - 1).to_pydict()  # and the 1e39 row: presence never stores it
    assert kept == {key: value for key, value in table.items() if key != "features__weight"}
    assert presence.num_rows == len(lines)


def test_libfm_values_are_kept_per_field_and_a_missing_field_weighs_one(tmp_path):
    lines = ["1 0:3:0.5 2:7:-2", "0 1:4:1", "-1 0:9:0 1:2:4.25"]
    (tmp_path / "a.libfm").write_text("\n".join(lines) + "\n")
    source, table = source_table(tmp_path / "a.libfm", LibSVMOptions())
    assert source.info.weighted == ["field_0", "field_1", "field_2"]
    rows = table.to_pydict()
    assert rows["field_0"] == [3, None, None] and rows["field_0__weight"] == [0.5, 1.0, 1.0]
    assert rows["field_1"] == [None, 4, 2] and rows["field_1__weight"] == [1.0, 1.0, 4.25]
    assert rows["field_2"] == [7, None, None] and rows["field_2__weight"] == [-2.0, 1.0, 1.0]


# --- the reader --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def libfm_dataset(tmp_path_factory):
    """A weighted libFM dataset: three single-valued fields with values, some missing."""
    root = tmp_path_factory.mktemp("weighted_libfm")
    rng = np.random.default_rng(7)
    lines = []
    for i in range(900):
        fields = [f for f in range(3) if rng.random() < 0.8]
        tokens = [f"{f}:{rng.integers(0, 40)}:{rng.normal():.4f}" for f in fields]
        lines.append(" ".join(["1" if i % 3 else "0", *tokens]))
    (root / "a.libfm").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(format="libsvm", inputs=[str(root / "a.libfm")], output=str(root / "data"), progress=False,
                          ids=IdConfig(num_embeddings=50), row_group_rows=100))
    return root / "data"


@pytest.fixture(scope="module")
def svm_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted_svm")
    lines = higgs_like_lines(900, seed=2)
    lines[::7] = [line.rsplit(" ", 2)[0] for line in lines[::7]]  # lists of several lengths
    (root / "a.svm").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(format="libsvm", inputs=[str(root / "a.svm")], output=str(root / "data"), progress=False,
                          ids=IdConfig(num_embeddings=40), row_group_rows=100))
    return root / "data"


def kjt_rows(kjt, batch_size):
    """Per key, each row's (ids, weights) of a KeyedJaggedTensor."""
    out = {}
    for key, jagged in kjt.to_dict().items():
        ids, weights = jagged.values().split(jagged.lengths().tolist()), jagged.weights().split(jagged.lengths().tolist())
        out[key] = [(i.tolist(), w.tolist()) for i, w in zip(ids, weights)]
        assert len(out[key]) == batch_size
    return out


@pytest.mark.parametrize("name", ["libfm", "svm"])
def test_shuffled_batches_carry_each_rows_weights(libfm_dataset, svm_dataset, name):
    dataset = {"libfm": libfm_dataset, "svm": svm_dataset}[name]
    schema = Schema.load(dataset)
    assert all(feature.weighted for feature in schema.sparse)
    table = read_all(dataset).to_pydict()
    by_row = {row_id: position for position, row_id in enumerate(table["row_id"])}
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=64, shuffle=True, shuffle_window_row_groups=3),
                           rank=0, world_size=1)
    seen = 0
    for batch in reader:
        rows = kjt_rows(batch.sparse, batch.batch_size)
        for b, row_id in enumerate(batch.row_ids.tolist()):
            position = by_row[row_id]
            for feature in schema.sparse_names:
                expected = table[feature][position]
                ids = expected if isinstance(expected, list) else [expected]
                assert rows[feature][b] == (ids, pytest.approx(np.atleast_1d(table[f"{feature}__weight"][position]).tolist()))
            seen += 1
        padded = kjt_rows(batch.padded_to(batch.batch_size + 3).sparse, batch.batch_size + 3)
        for feature in schema.sparse_names:
            assert padded[feature][: batch.batch_size] == rows[feature]
            assert padded[feature][batch.batch_size :] == [([0], [1.0])] * 3  # missing, weight 1
    assert seen == schema.split("train").rows
    padding = padding_batch(schema, 4)
    assert padding.sparse.weights().tolist() == [1.0] * 4 * len(schema.sparse)


def test_batches_keep_their_weights_through_pickling(svm_dataset):
    """What a DataLoader worker does with a batch: pickles it back to the main process."""
    batch = next(iter(ParquetReader(svm_dataset, "train", ReaderConfig(batch_size=32), rank=0, world_size=1)))
    copy = pickle.loads(pickle.dumps(batch))
    assert kjt_rows(copy.sparse, 32) == kjt_rows(batch.sparse, 32)


@pytest.mark.slow  # starting the worker processes takes a minute on a busy machine
def test_worker_processes_hand_out_the_weights(svm_dataset):
    config = ReaderConfig(batch_size=128)
    single = list(ParquetReader(svm_dataset, "train", config, rank=0, world_size=1))
    loader = ResumableLoader(ParquetReader(svm_dataset, "train", config, rank=0, world_size=1, num_workers=2))
    from_workers = {tuple(batch.row_ids.tolist()): batch for batch in loader}
    weights = {row: w for batch in single for row, w in zip(batch.row_ids.tolist(), kjt_rows(batch.sparse, batch.batch_size)["features"])}
    assert sum(batch.batch_size for batch in from_workers.values()) == len(weights)
    for batch in from_workers.values():
        for row, pair in zip(batch.row_ids.tolist(), kjt_rows(batch.sparse, batch.batch_size)["features"]):
            assert pair == weights[row]


# --- the tables ----------------------------------------------------------------------------------------


def weighted_schema(weighted=True):
    return Schema(name="w", label="label", dense=["d0"], sparse=[
        SparseFeature("user", 11, IDENTITY, weighted=weighted),
        SparseFeature("tags", 7, IDENTITY, multi_hot=True, weighted=weighted),
        SparseFeature("item", 13, IDENTITY),  # unweighted: weight 1 in a weighted batch
    ])


def test_weighted_pooled_embedding_is_the_sum_of_value_times_row(one_thread):
    torch.manual_seed(0)
    schema = weighted_schema()
    embedding, first_order = FieldEmbedding(schema, 4), FirstOrder(schema)
    assert embedding.ebc.is_weighted() and first_order.weights.ebc.is_weighted()
    assert not FieldEmbedding(weighted_schema(weighted=False), 4).ebc.is_weighted()
    with torch.no_grad():
        for module in (embedding, first_order):
            for table in module.modules():
                if isinstance(table, torch.nn.EmbeddingBag):
                    table.weight.normal_()
    batch_size = 5
    lengths = {"user": [1] * batch_size, "tags": [0, 3, 1, 2, 4], "item": [1] * batch_size}
    ids = {name: torch.randint(0, schema.feature(name).num_embeddings, (sum(lengths[name]),)) for name in lengths}
    weights = {name: torch.randn(sum(lengths[name])) for name in ("user", "tags")} | {"item": torch.ones(batch_size)}
    kjt = KeyedJaggedTensor(keys=schema.sparse_names, values=torch.cat([ids[n] for n in schema.sparse_names]),
                            lengths=torch.tensor(sum((lengths[n] for n in schema.sparse_names), []), dtype=torch.int32),
                            weights=torch.cat([weights[n] for n in schema.sparse_names]), stride=batch_size)
    dense = torch.randn(batch_size, 1)
    fields = embedding(dense, kjt)  # [B, 1 + 3, 4]
    linear = first_order(dense, kjt)  # [B, 1]
    expected_linear = (first_order.bias + dense[:, 0] * first_order.weights.dense_weight[0, 0]).detach()
    for f, name in enumerate(schema.sparse_names):
        table = embedding.ebc.embedding_bags[f"t_{name}"].weight.detach()
        first = first_order.weights.ebc.embedding_bags[f"w_{name}"].weight.detach()
        starts = np.cumsum([0] + lengths[name])
        for b in range(batch_size):
            bag = slice(int(starts[b]), int(starts[b + 1]))
            direct = sum((float(w) * table[int(i)] for i, w in zip(ids[name][bag], weights[name][bag])), torch.zeros(4))
            torch.testing.assert_close(fields[b, 1 + f], direct, rtol=1e-5, atol=1e-6)
            expected_linear[b] += sum(float(w) * float(first[int(i), 0]) for i, w in zip(ids[name][bag], weights[name][bag]))
    torch.testing.assert_close(linear[:, 0].detach(), expected_linear, rtol=1e-5, atol=1e-5)


# --- every stage on a weighted dataset ---------------------------------------------------------------

QUICK = {"epochs": 1, "log_every_steps": 5, "progress": False, "eval_batch_size": 4096}
MODEL = {"embedding_dim": 8}


def pipeline_recipe(root, values, stages):
    """prepare (libSVM, ``values``) and train, plus the other stages when ``stages``."""
    recipe = {
        "run_dir": str(root),
        "prepare": {"format": "libsvm", "inputs": [str(root.parent / "raw.svm")], "output": str(root / "data"),
                    "libsvm": {"values": values}, "ids": {"num_embeddings": 64}, "progress": False,
                    "row_group_rows": 500},
        "reader": {"batch_size": 128, "shuffle": True},
        "train": {"model": {"name": "dcn", "mlp_layers": [16], "cross_layers": 2, **MODEL}, **QUICK,
                  "optim": {"lr": 0.01}},
    }
    if stages:
        recipe |= {
            "infer": {"teachers": [{"name": "dcn", "train_output": str(root / "train" / "dcn")}], "batch_size": 512},
            "distill": {"model": {"name": "dnn", "mlp_layers": [16, 16], **MODEL},
                        "distill": {"teachers": ["dcn"], "loss": {"hard": 0.5, "mse": 1.0}}, **QUICK, "max_steps": 6},
            "compress": {"methods": ["afm"], "batch_size": 1000,
                         "steps": [{"what": "mlp", "ranks": {1: 4}}, {"what": "embeddings", "rank": 4}]},
        }
    return write_recipe(root / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every stage on a HIGGS-like libSVM file with its values, and prepare + train without them."""
    from recsys_kd.pipeline import run_pipeline
    from recsys_kd.recipe import load_recipe

    root = tmp_path_factory.mktemp("weighted_runs")
    (root / "raw.svm").write_text("\n".join(higgs_like_lines(4000)) + "\n")
    out = {}
    for values in ("weight", "presence"):
        (root / values).mkdir()
        run_pipeline(load_recipe(pipeline_recipe(root / values, values, stages=values == "weight")))
        out[values] = root / values
    return out


def test_the_values_are_what_the_model_learns_from(runs):
    weighted, presence = (json.loads((runs[v] / "train" / "dcn" / "train.json").read_text()) for v in ("weight", "presence"))
    assert Schema.load(runs["weight"] / "data").weighted and not Schema.load(runs["presence"] / "data").weighted
    # a linear rule of the values: far above chance with them; without them every row is the same indices
    assert weighted["test"]["auc"] > 0.8, weighted["test"]
    assert abs(presence["test"]["auc"] - 0.5) < 0.05, presence["test"]


def test_every_stage_keeps_the_weights_and_the_artifacts_match_their_models(runs):
    from recsys_kd.export.artifact import ArtifactError, load_artifact
    from recsys_kd.export.serving import example_major_inputs, example_major_weights
    from recsys_kd.export.server import Predictor
    from recsys_kd.train.checkpoint import load_model
    from recsys_kd.runs import TrainOutput

    run = runs["weight"]
    pipeline = json.loads((run / "pipeline.json").read_text())
    assert {"train", "infer", "distill", "compress", "export", "score"} <= set(pipeline["stages"]), pipeline["stages"]
    artifacts = sorted((run / "artifacts").glob("*.pt"))
    assert {path.name for path in artifacts} == {"teacher_dcn.pt", "student_dnn.pt", "compressed_dnn.pt"}
    dataset = run / "data"
    schema = Schema.load(dataset)
    batch = next(iter(ParquetReader(dataset, "test", ReaderConfig(batch_size=300), rank=0, world_size=1)))
    ids, offsets = example_major_inputs(batch.sparse.values(), batch.sparse.lengths(), batch.batch_size, 1)
    weights = example_major_weights(batch.sparse.weights(), batch.sparse.lengths(), batch.batch_size, 1)
    for path in artifacts:
        record = json.loads(path.with_name(path.name + ".export.json").read_text())
        assert record["parity"]["max_abs_diff"] < 1e-5
        module, metadata = load_artifact(path)
        assert metadata["model"]["input"]["weights"]["shape"] == ["N"]
        model = load_model(TrainOutput(record["train_output"]), record["checkpoint"].rsplit("/", 1)[-1], dataset)
        with torch.no_grad():
            expected = torch.sigmoid(model(batch.dense, batch.sparse))
            torch.testing.assert_close(module(batch.dense, ids, offsets, weights), expected, rtol=0, atol=1e-5)
            with pytest.raises(Exception, match="weighted"):
                module(batch.dense, ids, offsets)
            # the weights matter: all ones is another prediction
            assert not torch.allclose(module(batch.dense, ids, offsets, torch.ones_like(weights)), expected, atol=1e-3)
        score = json.loads((run / "scores" / path.stem / "score.json").read_text())
        assert score["metrics"]["rows"] == schema.split("test").rows
        assert score["metrics"]["auc"] == pytest.approx(record["parity"]["auc_artifact"], abs=score["metrics"]["auc_max_error"] + 1e-6)
        with pytest.raises(ArtifactError, match="weighted"):
            Predictor(module, metadata)
    compressed = json.loads((run / "compress" / "dnn" / "compress.json").read_text())
    assert compressed["final"], compressed


# --- 2 ranks -----------------------------------------------------------------------------------------

BATCH = 64
MP_MODEL = {"name": "deepfm", "embedding_dim": 4, "mlp_layers": [8]}


@pytest.mark.multiprocess
def test_two_ranks_match_one_process_on_a_weighted_dataset(tmp_path):
    (tmp_path / "a.svm").write_text("\n".join(higgs_like_lines(1500, seed=4)) + "\n")
    # row groups of one per-rank batch: the 1-process batch k is the union of the 2 ranks' batch k
    prepare(PrepareConfig(format="libsvm", inputs=[str(tmp_path / "a.svm")], output=str(tmp_path / "data"),
                          progress=False, ids=IdConfig(num_embeddings=300), row_group_rows=BATCH))

    def recipe(name, batch):
        return write_recipe(tmp_path / f"{name}.yaml", {
            "run_dir": str(tmp_path / name),
            "prepare": {"format": "libsvm", "inputs": [str(tmp_path / "a.svm")], "output": str(tmp_path / "data")},
            "reader": {"batch_size": batch, "shuffle": False},
            "train": {"model": MP_MODEL, "output": str(tmp_path / name), "epochs": 1, "progress": False,
                      "max_steps": 6, "sharding": {"type": "row_wise"}, "eval_batch_size": 1024,
                      "optim": {"embedding": "sgd", "embedding_lr": 0.05, "lr": 0.003}},
        })

    assert run_ranks(recipe("one", 2 * BATCH), 1) == [0]
    assert run_ranks(recipe("two", BATCH), 2) == [0, 0]
    one, two = (json.loads((tmp_path / name / "train.json").read_text()) for name in ("one", "two"))
    assert one["steps"] == two["steps"] == 6
    assert one["test"]["auc"] == pytest.approx(two["test"]["auc"], abs=2e-5)
    assert one["test"]["logloss"] == pytest.approx(two["test"]["logloss"], abs=2e-5)
    a, b = (final_weights(tmp_path / name, tmp_path / "data", MP_MODEL) for name in ("one", "two"))
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
        moved += 1
    assert moved > 5 and not math.isnan(one["test"]["logloss"])
