"""score: a prepared split and raw Criteo logs scored with an artifact alone, against the training
model's probabilities; outputs mirror the input parts; the record's streaming AUC/logloss against the
exact formulas; id rules (hash, vocabulary) reproduced from the artifact's schema; clear errors."""

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_kd.cli import main
from recsys_kd.data.criteo import CriteoOptions
from recsys_kd.data.parts import sidecar_path
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import IdRule, Schema, SchemaError, SparseFeature
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv
from recsys_kd.export import ArtifactError, export_artifact, load_artifact
from recsys_kd.export.score import PROBABILITY, batch_inputs, score_dataset
from recsys_kd.models import ModelConfig, build_model
from recsys_kd.train import checkpoint
from recsys_kd.train.metrics import auc, logloss
from tests.helpers import fake_train_output, read_split
from tests.ranks import call_on_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def _prepare_criteo(raw: Path, output: Path, **ids: Any) -> Path:
    integers = ids.pop("integers")
    prepare(PrepareConfig(format="criteo", inputs=[str(raw)], output=str(output), progress=False,
                          criteo=CriteoOptions(integers=integers), ids=IdConfig(**ids),
                          split=SplitConfig(method="random", seed=1), row_group_rows=500))
    return output


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Dict[str, Any]:
    """Raw Criteo logs, two datasets made from them (hashed ids with dense integers; vocabulary ids
    with bucketized integers), and an artifact of each."""
    root = tmp_path_factory.mktemp("score")
    raw = root / "raw" / "train.txt"
    write_criteo_tsv(SyntheticConfig(rows=3000, max_vocab=300), raw, progress=False)
    hashed = _prepare_criteo(raw, root / "hashed", integers="log", rule="hash", num_embeddings=200)
    vocab = _prepare_criteo(raw, root / "vocab", integers="bucketize", rule="vocab", min_count=2)
    artifacts = {}
    for name, dataset, model in (("hashed", hashed, "deepfm"), ("vocab", vocab, "dnn")):
        output = fake_train_output(root / "train" / name, dataset, model)
        artifacts[name] = root / f"{name}.pt"
        export_artifact(output, artifacts[name], parity_rows=64)
    return {"root": root, "raw": raw, "hashed": hashed, "vocab": vocab, "artifacts": artifacts}


def _training_probabilities(dataset: Path, artifact: Path, split: str) -> Dict[int, float]:
    """row_id -> the plain training model's probability (the checkpoint the artifact came from)."""
    source = load_artifact(artifact)[1]["model"]
    model = build_model(Schema.load(dataset), ModelConfig(**source["config"]))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    checkpoint.load_model_tensors(source["source"]["checkpoint"], state)
    model.load_state_dict({key[len("model."):]: value for key, value in state.items()})
    out = {}
    with torch.no_grad():
        for batch in ParquetReader(dataset, split, ReaderConfig(batch_size=1000), rank=0, world_size=1):
            probabilities = torch.sigmoid(model.eval()(batch.dense, batch.sparse))
            out.update(zip(batch.row_ids.tolist(), probabilities.tolist()))
    return out


def _scores(out_dir: Path, split: str) -> pa.Table:
    record = json.loads((out_dir / "score.json").read_text())
    return pa.concat_tables([pq.read_table(part["path"]) for part in record["parts"]])


def test_scoring_a_split_mirrors_its_parts_and_matches_the_training_model(setup, tmp_path) -> None:
    dataset, artifact = setup["hashed"], setup["artifacts"]["hashed"]
    out = tmp_path / "scores"
    record = score_dataset(artifact, dataset, out, split="test", batch_size=128, progress=False)
    schema = Schema.load(dataset)
    assert record["rows"] == schema.split("test").rows > 0 and record["split"] == "test"
    assert [Path(p["path"]).relative_to(out).as_posix() for p in record["parts"]] == schema.split("test").files
    for relative in schema.split("test").files:  # same rows, order and row groups as the input part
        source, scored = pq.ParquetFile(dataset / relative), pq.ParquetFile(out / relative)
        assert scored.num_row_groups == source.num_row_groups
        assert [scored.metadata.row_group(g).num_rows for g in range(scored.num_row_groups)] == [
            source.metadata.row_group(g).num_rows for g in range(source.num_row_groups)]
        assert scored.read().column("row_id").equals(source.read(columns=["row_id"]).column("row_id"))
        sidecar = json.loads(sidecar_path(out / relative).read_text())
        assert sidecar["rows"] == source.metadata.num_rows and sidecar["columns"] == [PROBABILITY]
    scores = _scores(out, "test")
    expected = _training_probabilities(dataset, artifact, "test")
    got = dict(zip(scores.column("row_id").to_pylist(), scores.column(PROBABILITY).to_pylist()))
    assert got.keys() == expected.keys()
    assert max(abs(got[r] - expected[r]) for r in got) < 1e-5
    # metrics: the streaming AUC within its stated bound of the exact one, logloss exact
    labels = read_split(dataset, "test").sort_by("row_id").column("label").to_numpy()
    probabilities = np.array([got[r] for r in sorted(got)], dtype=np.float32)
    metrics = record["metrics"]
    assert metrics["rows"] == len(labels) and metrics["positives"] == int(labels.sum())
    assert abs(metrics["auc"] - auc(labels, probabilities)) <= metrics["auc_max_error"] + 1e-12
    assert metrics["logloss"] == pytest.approx(logloss(labels, probabilities), rel=1e-9)
    assert json.loads((out / "score.json").read_text())["rows_per_second"] > 0
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(FileExistsError, match="score.json exists"):
        score_dataset(artifact, dataset, out, split="test", progress=False)
    assert score_dataset(artifact, dataset, out, split="valid", overwrite=True, progress=False)["split"] == "valid"
    assert json.loads((out / "score.json").read_text())["split"] == "valid"


def test_raw_logs_get_the_ids_prepare_gave_them(setup, tmp_path) -> None:
    raw = setup["raw"]
    for name, vocab_dir in (("hashed", None), ("vocab", setup["vocab"])):
        dataset, artifact = setup[name], setup["artifacts"][name]
        from_dataset = _scores_by_row(score_dataset(artifact, dataset, tmp_path / name / "test", progress=False))
        record = score_dataset(artifact, raw, tmp_path / name / "raw", vocab_dir=vocab_dir, rows_per_part=1000,
                               batch_size=300, progress=False)
        assert record["input"]["kind"] == "raw" and record["input"]["format"] == "criteo"
        assert record["rows"] == 3000 and [p["rows"] for p in record["parts"]] == [1000, 1000, 1000]
        from_raw = _scores_by_row(record)
        assert set(from_dataset) <= set(from_raw)
        difference = max(abs(from_raw[r] - from_dataset[r]) for r in from_dataset)
        assert difference < 1e-6, (name, difference)  # the same ids (batches differ: float rounding only)
        assert record["metrics"]["rows"] == 3000
    with pytest.raises(ArtifactError, match="vocabulary ids.*vocab_dir"):
        score_dataset(setup["artifacts"]["vocab"], raw, tmp_path / "novocab", progress=False)
    with pytest.raises(ArtifactError, match="vocabulary rows"):  # another dataset's vocabulary
        score_dataset(setup["artifacts"]["vocab"], raw, tmp_path / "wrong", vocab_dir=_other_vocab(setup, tmp_path),
                      progress=False)


def _scores_by_row(record: Dict[str, Any]) -> Dict[int, float]:
    table = pa.concat_tables([pq.read_table(part["path"]) for part in record["parts"]])
    return dict(zip(table.column("row_id").to_pylist(), table.column(PROBABILITY).to_pylist()))


def _other_vocab(setup: Dict[str, Any], tmp_path: Path) -> Path:
    other = tmp_path / "other"
    (other / "vocab").mkdir(parents=True)
    for path in (setup["vocab"] / "vocab").iterdir():
        table = pq.read_table(path)
        pq.write_table(table.slice(0, table.num_rows - 1), other / "vocab" / path.name)
    return other


def test_bad_raw_rows_are_quarantined_and_counted(setup, tmp_path) -> None:
    raw = tmp_path / "day_0"
    lines = setup["raw"].read_text().splitlines()[:200]
    lines[7] = "2\t" + lines[7].split("\t", 1)[1]  # label 2
    raw.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    record = score_dataset(setup["artifacts"]["hashed"], raw, out, progress=False)
    assert record["rows"] == 199 and record["quarantined"] == {"bad_label": 1}
    quarantined = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in quarantined] == [(8, "bad_label")]
    assert 7 not in _scores_by_row(record)


def test_a_dataset_with_other_features_is_refused(setup, tmp_path) -> None:
    with pytest.raises(SchemaError, match="dense columns .* differ from the artifact.s"):
        score_dataset(setup["artifacts"]["hashed"], setup["vocab"], tmp_path / "x", progress=False)
    other = _prepare_criteo(setup["raw"], tmp_path / "bigger", integers="log", rule="hash", num_embeddings=201)
    with pytest.raises(SchemaError, match="feature 'C1' has num_embeddings 201, the artifact was trained with 200"):
        score_dataset(setup["artifacts"]["hashed"], other, tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_batch_inputs_multi_hot_and_id_errors() -> None:
    rule = IdRule(kind="identity")
    schema = Schema(name="t", label="label", dense=["d"],
                    sparse=[SparseFeature("a", 5, rule), SparseFeature("tags", 4, rule, multi_hot=True)])
    table = pa.table({"row_id": pa.array([10, 11, 12], pa.int64()), "label": pa.array([1.0, 0.0, 1.0], pa.float32()),
                      "d": pa.array([0.5, 1.5, 2.5], pa.float32()), "a": pa.array([1, 2, 4], pa.int64()),
                      "tags": pa.array([[3], [], [1, 2]], pa.list_(pa.int64()))})
    limits = np.array([5, 4])
    row_ids, labels, (dense, ids, offsets) = batch_inputs(table, schema, limits, "f.parquet")
    assert row_ids.tolist() == [10, 11, 12] and labels.tolist() == [1.0, 0.0, 1.0]
    assert dense.tolist() == [[0.5], [1.5], [2.5]]
    # example-major bags: (a, tags) per example
    assert ids.tolist() == [1, 3, 2, 4, 1, 2] and offsets.tolist() == [0, 1, 2, 3, 3, 4, 6]
    bad = table.set_column(4, "tags", pa.array([[3], [], [1, 4]], pa.list_(pa.int64())))
    with pytest.raises(SchemaError, match=r"f.parquet: feature 'tags' has id 4 at row_id 12, outside \[0, 4\)"):
        batch_inputs(bad, schema, limits, "f.parquet")
    bad = table.set_column(3, "a", pa.array([1, -1, 4], pa.int64()))
    with pytest.raises(SchemaError, match="feature 'a' has id -1 at row_id 11"):
        batch_inputs(bad, schema, limits, "f.parquet")


def test_score_cli(setup, tmp_path, capsys) -> None:
    artifact, dataset = setup["artifacts"]["hashed"], setup["hashed"]
    assert main(["score", str(artifact), str(dataset), str(tmp_path / "cli"), "--split", "valid", "--no-progress"]) == 0
    assert "valid" in capsys.readouterr().out and (tmp_path / "cli" / "score.json").exists()
    assert main(["score", str(tmp_path / "missing.pt"), str(dataset), str(tmp_path / "x")]) == 2
    assert "missing.pt not found" in capsys.readouterr().err
    assert main(["score", str(artifact), str(dataset), str(tmp_path / "x"), "--split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    assert main(["score", str(artifact), str(dataset), str(tmp_path / "x"), "--batch-size", "0"]) == 2
    assert "--batch-size and --threads must be >= 1" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_ranks_score_what_one_process_scores(setup, tmp_path) -> None:
    dataset = tmp_path / "parts"  # the hashed dataset's features, in parts of 600 rows
    prepare(PrepareConfig(format="criteo", inputs=[str(setup["raw"])], output=str(dataset), progress=False,
                          ids=IdConfig(rule="hash", num_embeddings=200), split=SplitConfig(method="random", seed=1),
                          row_group_rows=300, rows_per_part=600))
    lines = setup["raw"].read_bytes().splitlines(keepends=True)
    for index in (3, 1700, 2900):
        lines[index] = b"7" + lines[index][1:]  # label 7: quarantined
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"".join(lines))
    runs = {
        "dataset": {"artifact": setup["artifacts"]["hashed"], "source": dataset, "split": "train", "batch_size": 128},
        "raw": {"artifact": setup["artifacts"]["vocab"], "source": raw, "vocab_dir": setup["vocab"], "rows_per_part": 700},
    }
    assert len(Schema.load(dataset).split("train").files) >= 4
    calls = {name: {**arguments, "out_dir": tmp_path / "two" / name, "progress": False} for name, arguments in runs.items()}
    assert call_on_ranks("recsys_kd.export.score:score_dataset", calls, tmp_path / "ranks") == {
        name: ["ok", "ok"] for name in runs}
    for name, arguments in runs.items():
        one = score_dataset(**arguments, out_dir=tmp_path / "one" / name, progress=False)
        two = json.loads((tmp_path / "two" / name / "score.json").read_text())
        assert one["world_size"] == 1 and two["world_size"] == 2 and all(r["rows"] > 0 for r in two["ranks"])
        assert two["rows"] == one["rows"] == sum(r["rows"] for r in two["ranks"])
        assert two["quarantined"] == one["quarantined"]
        assert two["metrics"]["rows"] == one["metrics"]["rows"] and two["metrics"]["positives"] == one["metrics"]["positives"]
        scores_one, scores_two = _scores(tmp_path / "one" / name, ""), _scores(tmp_path / "two" / name, "")
        assert scores_two.column("row_id").equals(scores_one.column("row_id"))  # the same rows, in input order
        if name == "dataset":  # the same batches: the same probabilities, histograms and sums
            assert scores_two.equals(scores_one)
            assert two["metrics"]["auc"] == one["metrics"]["auc"]
            assert two["metrics"]["logloss"] == pytest.approx(one["metrics"]["logloss"], rel=1e-12)
        else:  # batches cut at other rows: probabilities within float32 rounding of the batch's matmuls
            difference = np.abs(scores_two.column(PROBABILITY).to_numpy() - scores_one.column(PROBABILITY).to_numpy())
            assert difference.max() < 1e-6
            assert two["metrics"]["auc"] == pytest.approx(one["metrics"]["auc"], abs=one["metrics"]["auc_max_error"])
            assert two["metrics"]["logloss"] == pytest.approx(one["metrics"]["logloss"], rel=1e-9)
        if name == "dataset":  # outputs mirror the input parts, whichever rank scored them
            names = [Path(p["path"]).name for p in two["parts"]]
            assert names == [Path(p["path"]).name for p in one["parts"]]
            for part in one["parts"]:
                mirrored = Path(part["path"].replace(str(tmp_path / "one"), str(tmp_path / "two")))
                assert pq.read_table(mirrored).equals(pq.read_table(part["path"]))
                assert pq.ParquetFile(mirrored).num_row_groups == pq.ParquetFile(part["path"]).num_row_groups
        else:
            assert one["quarantined"] == {"bad_label": 3}
            assert (tmp_path / "two" / name / "quarantine.jsonl").read_bytes() == (
                tmp_path / "one" / name / "quarantine.jsonl").read_bytes()
        assert not [p for p in (tmp_path / "two" / name).rglob("*") if p.name.startswith(".")]
