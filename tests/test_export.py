"""Export: the serving module against the training model (every path: single-valued, multi-hot, dense
projection, first-order term, fp16/int8 storage), id and offset errors, and end-to-end artifacts (one
trained with the CLI, others from saved checkpoints) loaded in a fresh process that imports torch only."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.cli import main
from recsys_kd.compress import collect_statistics, compress_embeddings, compress_mlp
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.export import (
    ArtifactError,
    CompiledServing,
    CompilerMissing,
    ParityError,
    ServingModel,
    example_major_inputs,
    export_artifact,
    load_artifact,
    quantize_rows_int8,
    script_serving,
)
from recsys_kd.export.dagfm_serving import DAGFMServingHead, compiled_form
from recsys_kd.models import CTRModel, ModelConfig, build_model
from recsys_kd.models.heads import DAGFMHead
from recsys_kd.models.layers import DAGFM, MLP
from recsys_kd.models.low_rank import LowRankFieldEmbedding
from recsys_kd.runs import OutputError, TrainOutput, export_record
from recsys_kd.train import checkpoint
from tests.helpers import SMALL_MODEL, fake_train_output, save_train_output, tiny_batch, tiny_schema, visible_model

PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEMA = tiny_schema(with_hour=False)
TOL = dict(rtol=0, atol=1e-5)


def _script(module: ServingModel) -> torch.jit.ScriptModule:
    return script_serving(module)  # scripted, frozen, saved and loaded back, as an artifact is


def _model(name: str, **overrides: Any) -> CTRModel:
    return visible_model(SCHEMA, name, **overrides)


def _batch(batch_size: int, seed: int = 0, empty_bags: bool = True) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    """dense [B, 2] and a key-major KJT; the multi-hot feature has bags of 0..3 ids."""
    generator = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for feature in SCHEMA.sparse:
        if feature.multi_hot:
            length = torch.randint(0 if empty_bags else 1, 4, (batch_size,), generator=generator)
        else:
            length = torch.ones(batch_size, dtype=torch.int64)
        lengths.append(length)
        values.append(torch.randint(0, feature.num_embeddings, (int(length.sum()),), generator=generator))
    kjt = KeyedJaggedTensor.from_lengths_sync(SCHEMA.sparse_names, torch.cat(values), torch.cat(lengths).int())
    return torch.randn(batch_size, 2, generator=generator), kjt


def _serving_inputs(dense: torch.Tensor, kjt: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, offsets = example_major_inputs(kjt.values(), kjt.lengths(), dense.shape[0], len(kjt.keys()))
    return dense, ids, offsets


# ------------------------------------------------------------------------------ the serving module


@pytest.mark.parametrize(
    "name,overrides",
    [("deepfm", {}), ("xdeepfm", {}), ("dcnv2", {}), ("dagfm_outer", {}), ("dagfm_inner", {}), ("dagfm_plus", {}),
     ("lr", {}), ("fm", {"dense_mode": "none"})],
)
def test_serving_module_matches_the_training_model(name: str, overrides: Dict[str, Any]) -> None:
    model = _model(name, **overrides)
    serving = _script(ServingModel.from_model(model, num_dense_inputs=2))
    dense, kjt = _batch(32)
    with torch.no_grad():
        logits = model(dense, kjt)
        inputs = _serving_inputs(dense, kjt)
        torch.testing.assert_close(serving.forward_logits(*inputs), logits, **TOL)
        torch.testing.assert_close(serving(*inputs), torch.sigmoid(logits), **TOL)
        # all bags of length 1: the fast path (one F.embedding) computes the same function
        dense, kjt = _batch(16, seed=1)
        single = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values()[: 16 * 3], torch.ones(48, dtype=torch.int32))
        ids, offsets = example_major_inputs(single.values(), single.lengths(), 16, 3)
        assert torch.equal(offsets, torch.arange(49))
        torch.testing.assert_close(serving(dense, ids, offsets), torch.sigmoid(model(dense, single)), **TOL)
        # one example alone gives its row of the batch
        torch.testing.assert_close(serving(dense[2:3], ids[6:9], torch.arange(4)), serving(dense, ids, offsets)[2:3], **TOL)


@pytest.mark.parametrize("interaction", ["outer", "inner"])
@pytest.mark.parametrize("with_mlp", [False, True])
def test_dagfm_serving_head_equals_the_training_head_in_every_form(interaction: str, with_mlp: bool) -> None:
    """Blocks of 4 rows (batches 5 and 9 take 2 and 3 blocks, the last one short), the broadcast form up
    to 2 rows and the compiler form, scripted and frozen, against the training head on the same fields;
    a non-identity connection matrix and fields given as a transposed view (as AFM's up-projection
    hands them on)."""
    torch.manual_seed(0)
    head = DAGFMHead(DAGFM(5, 3, 2, interaction), MLP(15, [4]) if with_mlp else None).eval()
    with torch.no_grad():
        head.dagfm.connection.add_(0.3 * torch.randn(5, 5))
    serving = DAGFMServingHead(head, block_rows=4, small_batch=2).eval()
    scripted = torch.jit.freeze(torch.jit.script(serving))
    compiler, block_rows = compiled_form(DAGFMServingHead(head, block_rows=4, small_batch=2).eval())
    assert block_rows == 4
    with torch.no_grad():
        for batch_size in (1, 2, 3, 4, 5, 9):
            fields = torch.randn(5, batch_size, 3).transpose(0, 1)  # [B, F, D], not contiguous
            expected = head(fields)
            for module in (serving, scripted):
                torch.testing.assert_close(module(fields, None), expected, **TOL)
            if batch_size <= block_rows:  # the compiler form's callers hand it at most a block
                torch.testing.assert_close(compiler(fields, None), expected, **TOL)


def test_example_major_inputs_reorder_key_major_bags() -> None:
    # B = 2, F = 2: feature a bags [1], [2, 3]; feature b bags [], [4]
    ids, offsets = example_major_inputs(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 1]), 2, 2)
    assert ids.tolist() == [1, 2, 3, 4] and offsets.tolist() == [0, 1, 1, 3, 4]
    ids, offsets = example_major_inputs(torch.tensor([5, 6, 7, 8]), torch.tensor([1, 1, 1, 1]), 2, 2)
    assert ids.tolist() == [5, 7, 6, 8] and offsets.tolist() == [0, 1, 2, 3, 4]


def test_out_of_range_ids_and_bad_offsets_raise_clear_errors() -> None:
    serving = _script(ServingModel.from_model(_model("deepfm"), num_dense_inputs=2))
    dense = torch.zeros(2, 2)
    good = torch.tensor([3, 2, 5, 1, 6, 12])  # example-major, one id per bag
    assert serving(dense, good, torch.arange(7)).shape == (2,)
    empty = torch.zeros(0, dtype=torch.int64)
    assert serving(torch.zeros(0, 2), empty, torch.zeros(1, dtype=torch.int64)).shape == (0,)
    with pytest.raises(Exception, match=r"feature 'item' of example 1 has id 13, outside \[0, 13\)"):
        serving(dense, torch.tensor([3, 2, 5, 1, 6, 13]), torch.arange(7))
    with pytest.raises(Exception, match=r"feature 'user' of example 0 has id -1"):
        serving(dense, torch.tensor([-1, 2, 5, 1, 6, 12]), torch.arange(7))
    # multi-hot path: example 1's tags bag [6, 7]
    with pytest.raises(Exception, match=r"feature 'tags' of example 1 has id 7, outside \[0, 7\)"):
        serving(dense, torch.tensor([3, 2, 5, 1, 6, 7, 12]), torch.tensor([0, 1, 2, 3, 4, 6, 7]))
    with pytest.raises(Exception, match=r"offsets must be a 1-D int64 tensor of B \* F_sparse \+ 1"):
        serving(dense, good, torch.arange(6))
    with pytest.raises(Exception, match="end at len"):
        serving(dense, good, torch.tensor([0, 1, 2, 3, 4, 5, 7]))
    with pytest.raises(Exception, match="ids must be a 1-D int64"):
        serving(dense, good.int(), torch.arange(7))
    with pytest.raises(Exception, match=r"dense must have shape \[B, 2\]"):
        serving(torch.zeros(2, 3), good, torch.arange(7))


def test_int8_and_fp16_storage() -> None:
    weight = torch.randn(50, 8)
    weight[3] = 0.25  # a constant row is exact
    codes, scale, bias = quantize_rows_int8(weight)
    assert codes.dtype == torch.int8
    error = (codes.float() * scale + bias - weight).abs()
    assert (error <= scale / 2 + 1e-6).all() and error[3].max() == 0
    model = _model("deepfm")
    dense, kjt = _batch(64)
    inputs = _serving_inputs(dense, kjt)
    reference = torch.sigmoid(model(dense, kjt)).detach()
    for storage, tolerance in (("fp16", 2e-3), ("int8", 2e-2)):
        serving = ServingModel.from_model(model, num_dense_inputs=2, storage=storage)
        assert serving.weight.dtype == (torch.float16 if storage == "fp16" else torch.float32)
        assert storage != "int8" or serving.codes.dtype == torch.int8
        with torch.no_grad():
            difference = (_script(serving)(*inputs) - reference).abs().max()
        assert 0 < difference < tolerance, (storage, difference)


def _compressed(model: CTRModel, ranks: Any, fuse: bool, mlp_ranks: Dict[int, int], batches: List[Any]) -> CTRModel:
    """The AFM workflow on ``model``: its MLP (when ``mlp_ranks``), then its tables, from statistics of
    ``batches`` (reader-shaped ``Batch`` es)."""
    if mlp_ranks:
        model = compress_mlp(model, mlp_ranks, collect_statistics(model, batches, fields=False), relu_between=True)
    return compress_embeddings(model, ranks, collect_statistics(model, batches, layers=[]), fuse=fuse).eval()


@pytest.mark.parametrize(
    "name,ranks,fuse,mlp_ranks,overrides",
    [
        ("dnn", {"user": 2, "tags": 1}, True, {1: 3}, {}),  # fused into the first Linear, "item" kept at D
        ("dnn", 2, True, {}, {"dense_mode": "none"}),  # fused, one rank for all, no dense fields
        ("dnn", {"user": 3, "item": 1}, False, {0: 5}, {}),  # per-field up-projections, "tags" kept
        ("deepfm", {"user": 3, "tags": 2, "item": 1}, False, {1: 2}, {}),  # FM reads the fields; first order
        ("dagfm_outer", 3, False, {}, {}),  # the distilled student's architecture
        ("dagfm_outer", 2, False, {}, {"dense_mode": "none"}),  # the head gets the up-projection's view
        ("xdeepfm", {"user": 2, "item": 3}, False, {}, {"dense_mode": "none"}),  # CIN reads the fields
        ("dcnv2", 2, False, {1: 4}, {}),
        ("autoint_plus", 3, False, {}, {"dense_mode": "none"}),
        ("fibinet", {"tags": 1, "item": 2}, False, {}, {}),
    ],
)
def test_compressed_models_serve_with_parity(
    name: str, ranks: Any, fuse: bool, mlp_ranks: Dict[int, int], overrides: Dict[str, Any]
) -> None:
    batches = [tiny_batch(SCHEMA, seed, 64) for seed in range(4)]
    compressed = _compressed(visible_model(SCHEMA, name, **overrides), ranks, fuse, mlp_ranks, batches)
    assert isinstance(compressed.embedding, LowRankFieldEmbedding) and compressed.embedding.fused == fuse
    serving = ServingModel.from_model(compressed, num_dense_inputs=2)
    widths = [ranks.get(n, SMALL_MODEL["embedding_dim"]) if isinstance(ranks, dict) else ranks for n in SCHEMA.sparse_names]
    assert serving.table_width == max(widths)  # every table padded to the widest field
    scripted = _script(serving)
    dense, kjt = _batch(48)  # multi-hot bags of 0..3 ids, empty ones included
    with torch.no_grad():
        reference = torch.sigmoid(compressed(dense, kjt))
        assert (reference - reference.mean()).abs().max() > 1e-3  # not a constant model
        torch.testing.assert_close(scripted(*_serving_inputs(dense, kjt)), reference, **TOL)
        # the single-id fast path
        single = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values()[: 48 * 3], torch.ones(144, dtype=torch.int32))
        torch.testing.assert_close(scripted(*_serving_inputs(dense, single)), torch.sigmoid(compressed(dense, single)), **TOL)
        for storage, tolerance in (("fp16", 2e-3), ("int8", 2e-2)):
            quantized = _script(ServingModel.from_model(compressed, num_dense_inputs=2, storage=storage))
            difference = (quantized(*_serving_inputs(dense, kjt)) - reference).abs().max()
            assert difference < tolerance, (storage, difference)


def test_low_rank_tables_are_padded_to_one_lookup() -> None:
    batches = [tiny_batch(SCHEMA, seed, 64) for seed in range(4)]
    compressed = _compressed(visible_model(SCHEMA, "dnn"), {"user": 2, "tags": 1}, True, {}, batches)
    serving = ServingModel.from_model(compressed, num_dense_inputs=2)
    # widths user 2, tags 1, item D = 4: one fused table [sum V_f, 4], zero-padded beyond each width
    assert serving.table_width == 4 and serving.weight.shape == (11 + 7 + 13, 4)
    assert serving.weight[:11, 2:].abs().max() == 0 and serving.weight[11:18, 1:].abs().max() == 0
    assert serving.code_columns.tolist() == [0, 1, 4, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="width 2, not D = 4, and no up-projection"):
        ServingModel(compressed.head, [torch.zeros(11, 2), torch.zeros(7, 4)], ["user", "tags"], embedding_dim=4)


# ----------------------------------------------------------------------------- end-to-end artifacts


def _training_probabilities(train_output: Path, rows: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The plain training model's probabilities on the first test rows, and the artifact inputs."""
    record = json.loads((train_output / "train.json").read_text())
    dataset = Path(record["dataset"])
    schema = Schema.load(dataset)
    model = build_model(schema, ModelConfig(**record["config"]["model"]))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    checkpoint.load_model_tensors(train_output / "checkpoints" / "best", state)
    model.load_state_dict({key[len("model."):]: value for key, value in state.items()})
    batch = next(iter(ParquetReader(dataset, "test", ReaderConfig(batch_size=rows), rank=0, world_size=1)))
    with torch.no_grad():
        probabilities = torch.sigmoid(model.eval()(batch.dense, batch.sparse))
    dense, ids, offsets = _serving_inputs(batch.dense, batch.sparse)
    return probabilities, {"dense": dense, "ids": ids, "offsets": offsets}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, shared_data) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    movielens = root / "movielens"
    assert main(["prepare", "-c", "configs/movielens.yaml", f"prepare.inputs=[{shared_data / 'movielens-100k-recbole'}]",
                 f"prepare.output={movielens}", "prepare.progress=false"]) == 0
    synthetic = root / "synthetic"
    prepare(PrepareConfig(format="synthetic", output=str(synthetic), progress=False,
                          synthetic=SyntheticConfig(rows=3000, sparse_features=5, dense_features=2, max_vocab=200)))
    return {"root": root, "movielens": movielens, "synthetic": synthetic}


@pytest.fixture(scope="module")
def exported(datasets) -> List[Dict[str, Any]]:
    """One model trained with the CLI (deepfm, movielens) and three from saved checkpoints (synthetic,
    projected dense features), exported; with the training model's probabilities to compare."""
    root = datasets["root"]
    trained = root / "deepfm"
    assert main(["train", "-c", "configs/movielens.yaml", f"prepare.output={datasets['movielens']}",
                 f"train.output={trained}", "train.model.name=deepfm", "train.model.mlp_layers=[32,16]",
                 "train.max_steps=20", "train.epochs=1", "train.progress=false", "train.eval_batch_size=65536",
                 "train.sharding.type=table_wise"]) == 0
    outputs = [
        (trained, "float32"),
        (fake_train_output(root, datasets["synthetic"], "xdeepfm"), "float32"),
        (fake_train_output(root, datasets["synthetic"], "dagfm_outer"), "float32"),
        (fake_train_output(root, datasets["synthetic"], "dcnv2", cross_type="low_rank", low_rank=3), "int8"),
    ]
    cases = []
    for output, dtype in outputs:
        artifact = root / "artifacts" / f"{output.name}-{dtype}.pt"
        record = export_artifact(output, artifact, parity_rows=256, dtype=dtype)
        probabilities, inputs = _training_probabilities(output, 256)
        cases.append({"output": output, "artifact": artifact, "dtype": dtype, "record": record,
                      "probabilities": probabilities, "inputs": inputs})
    return cases


def test_export_records_and_metadata(exported) -> None:
    for case in exported:
        record, artifact = case["record"], case["artifact"]
        assert artifact.exists() and json.loads(export_record(artifact).read_text()) == json.loads(json.dumps(record))
        assert record["size_bytes"] == artifact.stat().st_size > 0
        assert record["parity"]["rows"] == 256 and record["latency_batch1_ms"] > 0
        if case["dtype"] == "float32":
            assert record["parity"]["max_abs_diff"] < 1e-5 and abs(record["parity"]["auc_delta"]) < 1e-3
        else:
            assert 0 < record["parity"]["max_abs_diff"] < 0.05 and record["parity"]["tolerance"] is None
        module, metadata = load_artifact(artifact)
        schema = Schema.load(Path(record["dataset"]))
        assert metadata["schema"] == json.loads(schema.to_json())
        model = metadata["model"]
        assert model["model"] == case["output"].name and model["storage_dtype"] == case["dtype"]
        assert model["libraries"]["torch"] == torch.__version__ and model["libraries"]["torchrec"]
        assert model["parameters"]["total"] > 0 and model["flops_per_example"] > 0
        assert model["source"]["checkpoint"].endswith("best") and model["metrics"]["test"]["auc"] > 0
        contract = model["input"]
        assert contract["bag_order"] == "example-major" and contract["offsets"]["F_sparse"] == len(schema.sparse)
        assert [f["name"] for f in contract["sparse_features"]] == schema.sparse_names
        assert contract["dense"]["columns"] == schema.dense
    trained = exported[0]["record"]
    assert trained["parity"]["split"] == "test" and exported[0]["output"].joinpath("train.json").exists()
    dense_used = [case["record"] for case in exported[1:]]
    assert all(load_artifact(r["artifact"])[1]["model"]["input"]["dense"]["used"] for r in dense_used)


def test_artifacts_load_and_match_in_a_process_with_torch_only(exported, tmp_path) -> None:
    cases = [case for case in exported if case["dtype"] == "float32"]
    for index, case in enumerate(cases):
        torch.save(case["inputs"], tmp_path / f"inputs_{index}.pt")
    script = f"""
import sys, torch
paths = {[str(case["artifact"]) for case in cases]!r}
outputs = []
for index, path in enumerate(paths):
    extra = {{"schema.json": "", "model.json": ""}}
    module = torch.jit.load(path, _extra_files=extra)
    assert extra["model.json"] and extra["schema.json"]
    inputs = torch.load(r"{tmp_path}/inputs_%d.pt" % index, weights_only=True)
    with torch.no_grad():
        outputs.append(module(inputs["dense"], inputs["ids"], inputs["offsets"]))
assert "torchrec" not in sys.modules and "fbgemm_gpu" not in sys.modules, sorted(sys.modules)
from recsys_kd.export import load_artifact
module, metadata = load_artifact(paths[0])
assert metadata["model"]["input"]["bag_order"] == "example-major"
assert "torchrec" not in sys.modules and "fbgemm_gpu" not in sys.modules
torch.save(outputs, r"{tmp_path}/outputs.pt")
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT, timeout=120)
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for case, output in zip(cases, outputs):
        assert output.shape == case["probabilities"].shape
        torch.testing.assert_close(output, case["probabilities"], **TOL)


def test_teacher_student_and_compressed_artifacts_score_in_a_torch_only_process(datasets, exported, tmp_path) -> None:
    """A DCNv2 teacher, a DAGFM-outer student and an AFM-compressed DNN (MLP and tables, fused into the
    first Linear; rebuilt from the compression steps in its train.json) exported from checkpoints: a
    fresh interpreter that imports torch alone loads each and reproduces the models' probabilities."""
    dataset = datasets["synthetic"]
    teacher = fake_train_output(tmp_path / "train", dataset, "dcnv2", seed=1)
    export_artifact(teacher, tmp_path / "dcnv2.pt", parity_rows=256)
    student = exported[2]
    assert student["output"].name == "dagfm_outer" and student["dtype"] == "float32"
    batches = list(ParquetReader(dataset, "train", ReaderConfig(batch_size=256), rank=0, world_size=1))[:4]
    compressed = _compressed(visible_model(Schema.load(dataset), "dnn", seed=2), 3, True, {1: 4}, batches)
    config = ModelConfig(name="dnn", **SMALL_MODEL, compression=compressed.compression_steps)
    save_train_output(tmp_path / "train" / "afm_dnn", dataset, compressed, config)
    record = export_artifact(tmp_path / "train" / "afm_dnn", tmp_path / "afm_dnn.pt", parity_rows=256)
    assert record["parity"]["max_abs_diff"] < 1e-5
    assert [step["what"] for step in load_artifact(tmp_path / "afm_dnn.pt")[1]["model"]["config"]["compression"]] == ["mlp", "embeddings"]

    teacher_probabilities, inputs = _training_probabilities(teacher, 256)
    batch = next(iter(ParquetReader(dataset, "test", ReaderConfig(batch_size=256), rank=0, world_size=1)))
    with torch.no_grad():
        compressed_probabilities = torch.sigmoid(compressed(batch.dense, batch.sparse))
    assert torch.equal(_serving_inputs(batch.dense, batch.sparse)[1], inputs["ids"])  # the same rows for all three
    cases = [(tmp_path / "dcnv2.pt", teacher_probabilities), (student["artifact"], student["probabilities"]),
             (tmp_path / "afm_dnn.pt", compressed_probabilities)]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
inputs = torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)
outputs = []
for path in {[str(path) for path, _ in cases]!r}:
    module = torch.jit.load(path)
    with torch.no_grad():
        outputs.append(module(inputs["dense"], inputs["ids"], inputs["offsets"]))
loaded = [name for name in ("recsys_kd", "torchrec", "fbgemm_gpu") if name in sys.modules]
assert not loaded, loaded
torch.save(outputs, r"{tmp_path / 'outputs.pt'}")
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for (path, expected), output in zip(cases, outputs):
        assert output.shape == expected.shape == (256,)
        assert (expected - expected.mean()).abs().max() > 1e-3, path  # not a constant model
        torch.testing.assert_close(output, expected, **TOL)


def test_parity_failure_raises_and_leaves_no_artifact(exported, monkeypatch, tmp_path) -> None:
    build = ServingModel.from_model

    def corrupted(model, *args, **kwargs):
        serving = build(model, *args, **kwargs)
        serving.weight[0].add_(1.0)  # row 0 of the first feature: id "missing", common in the data
        serving.weight[serving.row_offsets] += 1.0
        serving.dense_weight.add_(0.5)
        return serving

    monkeypatch.setattr(ServingModel, "from_model", corrupted)
    artifact = tmp_path / "broken.pt"
    with pytest.raises(ParityError, match="differ from the training model's"):
        export_artifact(exported[1]["output"], artifact, parity_rows=64)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_choice_and_fp16_storage(exported, tmp_path) -> None:
    trained = exported[0]["output"]
    record = export_artifact(trained, tmp_path / "latest.pt", checkpoint="latest", parity_rows=128, dtype="fp16")
    assert Path(record["checkpoint"]).name.startswith("step_")
    assert record["parity"]["tolerance"] is None and record["parity"]["max_abs_diff"] < 1e-2
    assert abs(record["parity"]["auc_delta"]) < 0.01
    assert load_artifact(tmp_path / "latest.pt")[1]["model"]["storage_dtype"] == "fp16"
    with pytest.raises(ArtifactError, match="step_9.*not a checkpoint.*known: best"):
        export_artifact(trained, tmp_path / "nope.pt", checkpoint="step_9")
    assert not (tmp_path / "nope.pt").exists()


def test_load_model_rebuilds_the_plain_model_from_a_train_output(datasets, tmp_path) -> None:
    dataset = datasets["synthetic"]
    output = TrainOutput(fake_train_output(tmp_path, dataset, "xdeepfm", seed=3))
    model = checkpoint.load_model(output)
    assert not model.training and model.name == "xdeepfm"
    expected = visible_model(Schema.load(dataset), "xdeepfm", seed=3).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    with pytest.raises(OutputError, match="no complete step checkpoint"):
        checkpoint.load_model(output, "latest")


# ------------------------------------------------------------------------------ the compiled kind


def test_compiled_format_without_a_compiler_fails_in_one_line_before_any_work(exported, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-x1")
    with pytest.raises(CompilerMissing, match="needs a C\\+\\+ compiler: 'no-such-compiler-x1' is not on PATH") as caught:
        export_artifact(exported[2]["output"], tmp_path / "student.pt2", parity_rows=64, format="aoti")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="format must be one of"):
        export_artifact(exported[2]["output"], tmp_path / "student.pt2", format="onnx")


@pytest.mark.slow
def test_compiled_artifact_matches_the_training_model_and_checks_its_inputs(exported, tmp_path) -> None:
    """The DAGFM-outer student through torch.export + AOTInductor (a C++ compile of ~1-2 minutes): the
    same parity check as TorchScript, the same input errors, and a fresh torch-only process loads it.
    Without a C++ compiler the export must fail with CompilerMissing, which is what is then checked."""
    student = exported[2]
    artifact = tmp_path / "student.pt2"
    try:
        from recsys_kd.export.compiled import cxx_compiler

        cxx_compiler()
    except CompilerMissing:
        with pytest.raises(CompilerMissing):
            export_artifact(student["output"], artifact, parity_rows=256, format="aoti")
        return
    record = export_artifact(student["output"], artifact, parity_rows=256, format="aoti")
    assert record["format"] == "aoti" and record["parity"]["max_abs_diff"] < 1e-5
    module, metadata = load_artifact(artifact)
    assert isinstance(module, CompiledServing) and metadata["model"]["artifact_format"] == "aoti"
    inputs = student["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(module(inputs["dense"], inputs["ids"], inputs["offsets"]), student["probabilities"], **TOL)
        scripted = load_artifact(student["artifact"])[0]
        features = len(metadata["schema"]["sparse"])
        one = (inputs["dense"][:1], inputs["ids"][:features], torch.arange(features + 1))
        torch.testing.assert_close(module(*one), scripted(*one), **TOL)
        module.block_rows = 100  # a batch larger than the block runs as blocks: 100 + 100 + 56 rows
        torch.testing.assert_close(module(inputs["dense"], inputs["ids"], inputs["offsets"]), student["probabilities"], **TOL)
        bad = inputs["ids"][:features].clone()
        bad[1] = 10**9
        with pytest.raises(ValueError, match="has id 1000000000, outside"):
            module(one[0], bad, one[2])
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
from recsys_kd.export import load_artifact
module, metadata = load_artifact(r"{artifact}")
inputs = torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)
with torch.no_grad():
    torch.save(module(inputs["dense"], inputs["ids"], inputs["offsets"]), r"{tmp_path / 'outputs.pt'}")
assert "torchrec" not in sys.modules and "fbgemm_gpu" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "outputs.pt", weights_only=True), student["probabilities"], **TOL)
    # score takes either kind: the same AUC from the .pt2 as from the TorchScript artifact
    from recsys_kd.export.score import score_dataset

    dataset = Path(student["record"]["dataset"])
    compiled = score_dataset(artifact, dataset, tmp_path / "scores_pt2", split="test", progress=False)
    scripted = score_dataset(student["artifact"], dataset, tmp_path / "scores_pt", split="test", progress=False)
    assert compiled["rows"] == scripted["rows"] > 0
    assert abs(compiled["metrics"]["auc"] - scripted["metrics"]["auc"]) < 1e-6
