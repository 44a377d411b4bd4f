"""Faults in what the later stages read and write: truncated or corrupt artifacts and Parquet parts, a dataset that lost a feature, a full disk, and the leftovers of failed or killed ``score`` runs.
Each is one ``recsys-kd <cmd>: error: ...`` line naming the file or feature (exit 2), and nothing
unfinished appears under a final name."""

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest

from recsys_kd.cli import main
from recsys_kd.data.criteo import CriteoOptions
from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.quarantine import TooManyBadRows
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema, SchemaError
from recsys_kd.data.split import SplitConfig
from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv
from recsys_kd.export import export_artifact
from recsys_kd.export.score import score_dataset
from recsys_kd.train.checkpoint import CheckpointError
from tests.faults.common import one_line_error, write_recipe
from tests.helpers import SMALL_MODEL, fake_train_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Dict[str, Any]:
    """Raw Criteo logs, a hashed dataset of them (parts of 600 rows), an FM train output on it (an FM's
    tensors do not depend on the number of features, so only the tables tell them apart) and its
    artifact, and a copy of the dataset whose schema lost its last feature."""
    root = tmp_path_factory.mktemp("faults")
    raw = root / "raw" / "train.txt"
    write_criteo_tsv(SyntheticConfig(rows=3000, max_vocab=300), raw, progress=False)
    dataset = root / "data"
    prepare(PrepareConfig(format="criteo", inputs=[str(raw)], output=str(dataset), progress=False,
                          criteo=CriteoOptions(integers="log"), ids=IdConfig(rule="hash", num_embeddings=200),
                          split=SplitConfig(method="random", seed=1), row_group_rows=200, rows_per_part=600))
    output = fake_train_output(root / "train", dataset, "fm")
    record = json.loads((output / "train.json").read_text())
    (output / "train.json").write_text(json.dumps({**record, "model": "fm"}))  # as the trainer writes it
    artifact = root / "fm.pt"
    export_artifact(output, artifact, parity_rows=64)
    fewer = root / "fewer"
    shutil.copytree(dataset, fewer)
    schema = json.loads((fewer / "schema.json").read_text())
    assert schema["sparse"][-1]["name"] == "C26"
    schema["sparse"] = schema["sparse"][:-1]
    (fewer / "schema.json").write_text(json.dumps(schema))
    return {"root": root, "raw": raw, "dataset": dataset, "output": output, "artifact": artifact, "fewer": fewer}


def _copy_dataset(setup, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(setup["dataset"], copy)
    return copy


def _garble(part: Path) -> None:
    """Overwrites the first page header, leaving the footer intact (the file still opens)."""
    data = bytearray(part.read_bytes())
    data[4:68] = b"\xff" * 64
    part.write_bytes(bytes(data))


def _parts(directory: Path):
    return sorted(p.name for p in directory.rglob("*") if p.is_file() and p.name.endswith(".parquet"))


# --- score ------------------------------------------------------------------------------------------


def test_score_on_raw_logs_quarantines_a_3mb_field(setup, tmp_path):
    lines = setup["raw"].read_bytes().splitlines(keepends=True)[:300]
    fields = lines[11].rstrip(b"\n").split(b"\t")
    fields[30] = b"f" * (3 << 20)
    lines[11] = b"\t".join(fields) + b"\n"
    raw = tmp_path / "train.txt"
    raw.write_bytes(b"".join(lines))
    record = score_dataset(setup["artifact"], raw, tmp_path / "out", progress=False)
    assert record["quarantined"] == {"field_too_long": 1} and record["rows"] == 299


def test_a_truncated_artifact_is_one_line(setup, tmp_path, capsys):
    artifact = tmp_path / "fm.pt"
    data = setup["artifact"].read_bytes()
    artifact.write_bytes(data[: len(data) // 2])
    assert main(["score", str(artifact), str(setup["dataset"]), str(tmp_path / "out"), "--no-progress"]) == 2
    one_line_error(capsys.readouterr(), "recsys-kd score: error:", artifact)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_corrupt_part_in_score_is_one_line_and_publishes_nothing(setup, tmp_path, capsys, damage):
    dataset = _copy_dataset(setup, tmp_path)
    parts = Schema.load(dataset).split("train").files
    assert len(parts) >= 2
    part = dataset / parts[1]  # the first part scores, then the second fails
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    else:
        _garble(part)
    out = tmp_path / "out"
    assert main(["score", str(setup["artifact"]), str(dataset), str(out), "--split", "train", "--no-progress"]) == 2
    one_line_error(capsys.readouterr(), "recsys-kd score: error:", part)
    assert _parts(out) == [] and not list(out.rglob("*.tmp")) and not (out / "score.json").exists()


def test_a_failed_raw_score_publishes_no_part(setup, tmp_path):
    lines = setup["raw"].read_bytes().splitlines(keepends=True)[:400]
    for index in range(0, 400, 50):
        lines[index] = b"7" + lines[index][1:]  # label 7
    raw = tmp_path / "train.txt"
    raw.write_bytes(b"".join(lines))
    out = tmp_path / "out"
    with pytest.raises(TooManyBadRows) as raised:
        score_dataset(setup["artifact"], raw, out, rows_per_part=100, progress=False)
    assert _parts(out) == [] and not list(out.rglob("*.tmp")) and not list(out.rglob("part-*.json"))
    assert (out / "quarantine.jsonl").exists() and str(out / "quarantine.jsonl") in str(raised.value)


def test_a_rerun_of_score_removes_what_a_killed_run_left(setup, tmp_path):
    out = tmp_path / "out"
    stale = [out / "test" / ".part-00000.parquet.4242.tmp", out / "test" / ".part-00000.parquet.json.x1y2z3.tmp",
             out / ".score.json.abc123.tmp"]
    kept = [out / "test" / "notes.tmp", out / "test" / ".other.parquet.4242.tmp", tmp_path / ".part-00000.parquet.1.tmp"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    score_dataset(setup["artifact"], setup["dataset"], out, progress=False)
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in kept)


def test_score_of_a_dataset_without_a_feature_names_it(setup, tmp_path, capsys):
    assert main(["score", str(setup["artifact"]), str(setup["fewer"]), str(tmp_path / "out"), "--no-progress"]) == 2
    one_line_error(capsys.readouterr(), "feature 'C26'", setup["fewer"])


# --- the reader (train, distill) ----------------------------------------------------------------------


def test_a_corrupt_part_in_a_training_read_names_the_part(setup, tmp_path):
    dataset = _copy_dataset(setup, tmp_path)
    part = dataset / Schema.load(dataset).split("train").files[0]
    _garble(part)
    with pytest.raises(SchemaError, match=f"{part}: damaged: expected checksum"):  # verified first
        ParquetReader(dataset, "train", ReaderConfig(batch_size=128, shuffle=False), rank=0, world_size=1)
    # unverified (reader.verify: false, or a dataset written before checksums), the read names the part
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=128, shuffle=False, verify=False), rank=0, world_size=1)
    with pytest.raises(SchemaError, match=f"{part}: cannot read row group 0"):
        list(reader)
    part.write_bytes(part.read_bytes()[:50])
    with pytest.raises(SchemaError, match=str(part)):
        ParquetReader(dataset, "train", ReaderConfig(batch_size=128, verify=False), rank=0, world_size=1)


def test_a_corrupt_part_in_train_is_one_line(setup, tmp_path, capsys):
    dataset = _copy_dataset(setup, tmp_path)
    part = dataset / Schema.load(dataset).split("train").files[1]
    _garble(part)
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "run_dir": str(tmp_path / "run"), "prepare": {"output": str(dataset)}, "reader": {"batch_size": 256},
        "train": {"model": {"name": "fm", "embedding_dim": 4}, "epochs": 1, "progress": False, "backend": "gloo"},
    })
    assert main(["train", "-c", str(recipe)]) == 2
    one_line_error(capsys.readouterr(), "recsys-kd train: error:", part)


# --- export, init_from ----------------------------------------------------------------------------


def _export_cli(setup, tmp_path, source: Path, dataset: Path) -> int:
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "run_dir": str(tmp_path / "run"), "prepare": {"output": str(dataset)},
        "export": {"source": str(source), "output": str(tmp_path / "out.pt"), "parity_rows": 64},
    })
    return main(["export", "-c", str(recipe)])


def test_export_with_a_dataset_that_lost_a_feature_is_one_line(setup, tmp_path, capsys):
    assert _export_cli(setup, tmp_path, setup["output"], setup["fewer"]) == 2
    one_line_error(capsys.readouterr(), "recsys-kd export: error:", "'C26'")
    assert not (tmp_path / "out.pt").exists()


def test_init_from_a_checkpoint_with_a_feature_the_dataset_lacks_is_refused(setup, tmp_path):
    from recsys_kd.models import ModelConfig
    from recsys_kd.train.config import TrainConfig
    from recsys_kd.train.trainer import train

    config = TrainConfig(model=ModelConfig(name="fm", **SMALL_MODEL), output=str(tmp_path / "student"), epochs=1,
                         max_steps=1, progress=False, backend="gloo", init_from=str(setup["output"] / "checkpoints" / "best"),
                         init_from_part="embeddings")
    with pytest.raises(CheckpointError, match="'C26'"):
        train(config, setup["fewer"], ReaderConfig(batch_size=256))


def test_export_to_a_full_disk_reports_the_disk_not_the_cleanup(setup, tmp_path, capsys, monkeypatch):
    def full(source, target, *args, **kwargs):  # as os.replace reports it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source), None, str(target))

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "replace", full)
    monkeypatch.setattr(os, "unlink", read_only)
    assert _export_cli(setup, tmp_path, setup["output"], setup["dataset"]) == 2
    monkeypatch.undo()
    line = one_line_error(capsys.readouterr(), "recsys-kd export: error:", os.strerror(errno.ENOSPC), tmp_path / "out.pt")
    assert os.strerror(errno.EROFS) not in line
    assert not (tmp_path / "out.pt").exists()


def test_a_failed_artifact_write_is_one_line_naming_the_file(setup, tmp_path, capsys, monkeypatch):
    """torch's zip writer reports a full or read-only disk as a RuntimeError; export names the file."""
    import torch

    def failing_save(module, path, _extra_files=None):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch.jit, "save", failing_save)
    assert _export_cli(setup, tmp_path, setup["output"], setup["dataset"]) == 2
    monkeypatch.undo()
    one_line_error(capsys.readouterr(), "recsys-kd export: error:", "cannot write the artifact", "PytorchStreamWriter")
    assert not (tmp_path / "out.pt").exists()
