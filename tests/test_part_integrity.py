"""Part integrity: a flipped byte in any Parquet part is detected before its values are used.

Without checksums most single-byte flips in a part read back as other values with no error (shown
below: that is the defect). Every part now has a crc32 recorded when it was written (``schema.json``
for a prepared dataset, the sidecar for infer and score outputs), and the reader, side inputs, score
and infer's rerun check it. Old manifests without checksums still load and read, with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_kd.cli import main
from recsys_kd.config import from_dict
from recsys_kd.data import integrity
from recsys_kd.data.integrity import ChecksumError, IntegrityWarning, file_checksum
from recsys_kd.data.parts import PartWriter, part_complete, part_schema, sidecar_path
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.data.side_inputs import verify_alignment
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.recipe import load_recipe
from tests.trainrun import free_port, write_recipe

PROJECT = Path(__file__).resolve().parents[1]
FLIPS = 24  # offsets spread over the part, header and footer included


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset: 5 sparse and 2 dense features, parts of 3 row groups of 300 rows."""
    root = tmp_path_factory.mktemp("integrity") / "data"
    synthetic = SyntheticConfig(rows=3000, seed=5, sparse_features=5, dense_features=2, max_vocab=300, chunk_rows=1000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root), progress=False,
                          row_group_rows=300, rows_per_part=900))
    return root


def _copy(dataset: Path, target: Path) -> Path:
    shutil.copytree(dataset, target)
    return target


def _flip(path: Path, offset: int) -> None:
    """Inverts the byte at ``offset`` in place. A rewrite within the file system's timestamp granularity
    may keep mtime and ctime, so mtime is moved on to make the change visible to the verification cache
    (as any real rewrite some time later is)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def _read(dataset: Path, split: str, verify: bool) -> List[np.ndarray]:
    """Every value of the split, in order: row_ids, labels, dense, sparse ids."""
    reader = ParquetReader(dataset, split, ReaderConfig(batch_size=100_000, verify=verify), rank=0, world_size=1)
    batch = next(iter(reader))
    return [batch.row_ids.numpy().copy(), batch.labels.numpy().copy(), batch.dense.numpy().copy(),
            batch.sparse.values().numpy().copy()]


def _silent_flip(data: Path, split: str, part: Path) -> None:
    """Flips a byte in the data pages of ``part`` that Parquet reads without an error, as other values."""
    clean = _read(data, split, verify=False)
    size = part.stat().st_size
    for offset in range(size // 4, size // 2, 7):
        _flip(part, offset)
        try:
            read = _read(data, split, verify=False)
        except Exception:  # noqa: BLE001  (this flip is an error of its own)
            read = clean
        if any(not np.array_equal(a, b) for a, b in zip(read, clean)):
            return
        _flip(part, offset)
    raise AssertionError(f"no single-byte flip of {part} reads silently")


def _offsets(size: int) -> List[int]:
    return sorted({0, 3, size - 1, size - 5, *np.linspace(4, size - 6, FLIPS - 4).astype(int).tolist()})


def test_every_flipped_byte_of_a_part_is_detected_and_names_the_part(dataset, tmp_path) -> None:
    data = _copy(dataset, tmp_path / "data")
    schema = Schema.load(data)
    part = data / schema.split("train").files[1]
    assert schema.split("train").checksums[schema.split("train").files[1]] == file_checksum(part)
    clean = _read(data, "train", verify=True)
    original = part.read_bytes()
    silent = 0
    offsets = _offsets(len(original))
    for offset in offsets:
        _flip(part, offset)
        with pytest.raises(ChecksumError) as raised:
            _read(data, "train", verify=True)
        message = str(raised.value)
        assert str(part) in message and "\n" not in message, (offset, message)
        assert "expected checksum crc32:" in message and "actual crc32:" in message and "re-run prepare" in message
        # the defect the checksum closes: unverified, some flips read back as other values, no error
        try:
            read = _read(data, "train", verify=False)
        except Exception:  # noqa: BLE001  (a flip in a header or the footer: an Arrow or Parquet error)
            pass
        else:
            silent += any(not np.array_equal(a, b) for a, b in zip(read, clean))
        part.write_bytes(original)
    assert silent >= 1, f"no flip of {len(offsets)} was read silently; the demonstration needs one"
    assert all(np.array_equal(a, b) for a, b in zip(_read(data, "train", verify=True), clean))


def test_a_file_is_read_once_per_process_and_again_when_it_changes(dataset, tmp_path, monkeypatch) -> None:
    data = _copy(dataset, tmp_path / "data")
    reads: Dict[str, int] = {}
    real = integrity.file_checksum

    def counting(path):
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real(path)

    monkeypatch.setattr(integrity, "file_checksum", counting)
    files = Schema.load(data).split("valid").files
    for _ in range(3):  # three readers, several passes each
        reader = ParquetReader(data, "valid", ReaderConfig(batch_size=128), rank=0, world_size=1)
        for epoch in range(2):
            reader.set_epoch(epoch)
            assert sum(batch.batch_size for batch in reader) == reader.split_rows
    assert reads == {Path(f).name: 1 for f in files}
    _flip(data / files[0], 100)
    with pytest.raises(ChecksumError, match=files[0]):
        ParquetReader(data, "valid", ReaderConfig(), rank=0, world_size=1)
    assert reads[Path(files[0]).name] == 2


def test_verify_false_skips_the_check(dataset, tmp_path) -> None:
    data = _copy(dataset, tmp_path / "data")
    part = data / Schema.load(data).split("train").files[0]
    expected = _read(data, "train", verify=True)
    _silent_flip(data, "train", part)
    read = _read(data, "train", verify=False)
    assert any(not np.array_equal(a, b) for a, b in zip(read, expected))  # other values, no error
    with pytest.raises(ChecksumError):
        _read(data, "train", verify=True)
    recipe = load_recipe(None, ["reader.verify=false"])
    assert recipe.reader.verify is False and from_dict(ReaderConfig, {}).verify is True


def test_an_old_schema_without_checksums_loads_reads_and_warns_once(dataset, tmp_path) -> None:
    data = _copy(dataset, tmp_path / "data")
    manifest = json.loads((data / "schema.json").read_text())
    for split in manifest["splits"].values():
        del split["checksums"]
    (data / "schema.json").write_text(json.dumps(manifest))
    assert Schema.load(data).split("train").checksums == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [len(_read(data, "train", verify=True)[0]) for _ in range(2)]
    assert rows == [Schema.load(data).split("train").rows] * 2
    found = [w for w in caught if issubclass(w.category, IntegrityWarning)]
    assert len(found) == 1, [str(w.message) for w in found]
    text = warnings.formatwarning(found[0].message, found[0].category, found[0].filename, found[0].lineno)
    assert text.count("\n") == 1 and "cannot be verified" in text and "re-run prepare" in text
    assert str(data / "schema.json") in text and "'train'" in text


def _side_input(dataset: Path, side: Path, with_checksums: bool = True) -> None:
    """A side input as infer writes it (one float column ``teacher_x`` = row_id / 1000), without a model."""
    schema = Schema.load(dataset)
    splits = {}
    for split in ("train", "valid", "test"):
        for relative in schema.split(split).files:
            parquet = pq.ParquetFile(dataset / relative)
            writer = PartWriter(side / relative, part_schema(["teacher_x"]))
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=["row_id"]).column("row_id").to_numpy()
                writer.add(group, ids, (ids / 1000.0).reshape(-1, 1))
            writer.close()
            if not with_checksums:
                sidecar = json.loads(sidecar_path(side / relative).read_text())
                del sidecar["checksum"]
                sidecar_path(side / relative).write_text(json.dumps(sidecar))
        splits[split] = {"files": schema.split(split).files, "rows": schema.split(split).rows}
    (side / "side.json").write_text(json.dumps({"dataset": str(dataset), "columns": ["teacher_x"], "splits": splits}))


def test_side_input_parts_are_verified_against_their_sidecars(dataset, tmp_path) -> None:
    side = tmp_path / "soft"
    _side_input(dataset, side)
    config = ReaderConfig(batch_size=100_000, extras=["teacher_x"])
    batch = next(iter(ParquetReader(dataset, "train", config, rank=0, world_size=1, side_inputs=[side])))
    np.testing.assert_allclose(batch.extras["teacher_x"].numpy(), batch.row_ids.numpy() / 1000.0, rtol=1e-6)
    part = side / Schema.load(dataset).split("train").files[2]
    _flip(part, part.stat().st_size // 3)
    with pytest.raises(ChecksumError, match=f"{part}: damaged: .*re-run infer"):
        ParquetReader(dataset, "train", config, rank=0, world_size=1, side_inputs=[side])
    with pytest.raises(ChecksumError, match=str(part)):
        verify_alignment(dataset, side)
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=100_000, extras=["teacher_x"], verify=False),
                           rank=0, world_size=1, side_inputs=[side])
    assert reader.split_rows == Schema.load(dataset).split("train").rows

    old = tmp_path / "old_soft"  # sidecars written before checksums: read, with one warning
    _side_input(dataset, old, with_checksums=False)
    with pytest.warns(IntegrityWarning, match="its parts .*cannot be verified; re-run infer"):
        assert verify_alignment(dataset, old)["train"] == Schema.load(dataset).split("train").rows


def test_part_complete_redoes_a_damaged_part_with_a_warning(tmp_path) -> None:
    final = tmp_path / "train" / "part-00000.parquet"
    writer = PartWriter(final, part_schema(["probability"]))
    writer.add(0, np.arange(50), np.linspace(0, 1, 50, dtype=np.float32).reshape(-1, 1))
    writer.close()
    assert json.loads(sidecar_path(final).read_text())["checksum"] == file_checksum(final)
    assert part_complete(final, [50], ["probability"])
    _flip(final, final.stat().st_size // 2)
    with pytest.warns(IntegrityWarning, match=f"{final}: damaged: expected checksum .*; redoing it"):
        assert not part_complete(final, [50], ["probability"])
    assert part_complete(final, [50], ["probability"], verify=False)


# ---------------------------------------------------------------------------------------- score


@pytest.fixture(scope="module")
def artifact(dataset, tmp_path_factory) -> Path:
    from recsys_kd.export import export_artifact
    from tests.helpers import fake_train_output

    root = tmp_path_factory.mktemp("integrity_artifact")
    output = fake_train_output(root / "train", dataset, "dnn")
    export_artifact(output, root / "dnn.pt", parity_rows=64)
    return root / "dnn.pt"


def test_score_on_a_damaged_dataset_exits_2_with_one_line(dataset, artifact, tmp_path, capsys) -> None:
    data = _copy(dataset, tmp_path / "data")
    part = data / Schema.load(data).split("test").files[0]
    clean = tmp_path / "clean"
    assert main(["score", str(artifact), str(data), str(clean), "--no-progress"]) == 0
    _silent_flip(data, "test", part)  # unverified, the defect is wrong predictions with exit 0
    capsys.readouterr()
    assert main(["score", str(artifact), str(data), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"recsys-kd score: error: {part}: damaged: expected checksum")
    assert "re-run prepare" in err and not (tmp_path / "out" / "score.json").exists()

    # --no-verify reads it as it is: exit 0, other predictions
    assert main(["score", str(artifact), str(data), str(tmp_path / "unverified"), "--no-progress", "--no-verify"]) == 0
    probabilities = [pq.read_table(tmp_path / d / "test" / part.name).column("probability").to_numpy()
                     for d in ("clean", "unverified")]
    assert not np.array_equal(*probabilities)


# ---------------------------------------------------------------------------------------- infer


def _infer(config: Path) -> subprocess.CompletedProcess:
    """``recsys-kd infer`` as one torchrun-style process; its output captured."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "recsys_kd.cli", "infer", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.multiprocess
def test_infer_rerun_redoes_a_damaged_part_and_ends_with_the_clean_soft_labels(dataset, tmp_path) -> None:
    from tests.helpers import fake_train_output

    teacher = fake_train_output(tmp_path / "teachers", dataset, "fm")
    record = json.loads((teacher / "train.json").read_text())  # what infer reads of a trained teacher
    record.update(model="fm", parameters={"total": 0}, flops_per_example=0)
    (teacher / "train.json").write_text(json.dumps(record))
    output = tmp_path / "soft"
    config = write_recipe(tmp_path / "infer.yaml", {
        "run_dir": str(tmp_path), "prepare": {"format": "synthetic", "output": str(dataset)},
        "infer": {"teachers": [{"name": "fm", "train_output": str(teacher)}], "output": str(output),
                  "batch_size": 128, "progress": False},
    })
    first = _infer(config)
    assert first.returncode == 0, first.stdout + first.stderr
    schema = Schema.load(dataset)
    files = [f for split in ("train", "valid", "test") for f in schema.split(split).files]
    clean = {f: pq.read_table(output / f) for f in files}

    damaged = output / schema.split("train").files[1]
    _flip(damaged, damaged.stat().st_size // 2)
    rerun = _infer(config)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{damaged}: damaged: expected checksum" in rerun.stderr and "redoing it" in rerun.stderr
    redone = json.loads((output / "infer.json").read_text())
    assert redone["rows_scored_this_run"] == pq.ParquetFile(damaged).metadata.num_rows  # that part only
    for f in files:
        assert pq.read_table(output / f).equals(clean[f]), f
    verify_alignment(dataset, output)
    assert not list(output.rglob("*.tmp"))
