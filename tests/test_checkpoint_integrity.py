"""Checkpoints and artifacts are checked before use: files against the checksums recorded when they
were written (a damaged newest checkpoint makes resume fall back to the previous one), and no code
runs from a run directory (DCP metadata and non-tensor values are read by restricted unpicklers,
artifacts by TorchScript's loader, which resolves no Python global)."""

import json
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from recsys_kd.cli import _parser, main
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.export.artifact import ArtifactError, ArtifactWarning, export_artifact, load_artifact
from recsys_kd.export.server import make_server
from recsys_kd.io import file_crc32
from recsys_kd.models.zoo import ModelConfig, build_model
from recsys_kd.runs import TrainOutput, export_record
from recsys_kd.train import checkpoint, hooks
from recsys_kd.train.checkpoint import CheckpointError, CheckpointIntegrityError, CheckpointWarning
from recsys_kd.train.task import LabelTask
from tests.trainrun import run_ranks, write_recipe

MODEL = {"name": "deepfm", "embedding_dim": 8, "mlp_layers": [16]}
# 3200 training rows at 256 a batch: 13 steps an epoch; checkpoints at steps 4 and 8 (keep 2)
SETTINGS = {"epochs": 1, "max_steps": 12, "checkpoint_every_steps": 4, "eval_every_steps": 4, "patience": 10}
CRASH_AT = 10  # an interrupted run dies as step 10 starts: step_4 and step_8 exist, latest is step_8
DATA_FILE = "__0_0.distcp"
PAYLOAD_GLOBAL = f"{open.__module__}.{open.__name__}"  # io.open: what the payload below pickles as


class _Crash(Exception):
    pass


class _Payload:
    """Unpickled by plain pickle, creates ``marker``: what a planted checkpoint or artifact would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("integrity")
    synthetic = SyntheticConfig(rows=4000, seed=3, sparse_features=5, dense_features=2, max_vocab=300, chunk_rows=2000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=256))
    return root


def _recipe(root: Path, name: str) -> Path:
    return write_recipe(root / f"{name}.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 256, "shuffle": True},
        "train": {"model": MODEL, "output": str(root / name), "progress": False, **SETTINGS},
    })


def _train(root: Path, name: str, *overrides: str) -> int:
    return main(["train", "-c", str(_recipe(root, name)), f"train.output={root / name}", *overrides])


@pytest.fixture(scope="module")
def whole(root):
    """An uninterrupted run: its record."""
    assert _train(root, "whole") == 0
    return json.loads((root / "whole" / "train.json").read_text())


@pytest.fixture(scope="module")
def crashed(root):
    """A run that died at step CRASH_AT (its checkpoints: step_4, step_8, best), not to be changed: copy it."""

    def crash(rank: int, step: int) -> None:
        if step == CRASH_AT:
            raise _Crash()

    remove = hooks.register("train_step", crash)
    try:
        with pytest.raises(_Crash):
            _train(root, "crashed")
    finally:
        remove()
    output = TrainOutput(root / "crashed")
    assert output.latest().name == "step_000000008" and output.known_checkpoints() == ["best", "step_000000004", "step_000000008"]
    return root / "crashed"


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _template(root: Path):
    return LabelTask(build_model(Schema.load(root / "data"), ModelConfig(**MODEL))).state_dict()


def damage(root: Path, path: Path) -> str:
    """Overwrites up to 4 KB of the largest model tensor's bytes in the checkpoint's data file with
    zeros, as a lost disk block would, where DCP and torch.load do not notice; returns the file name."""
    tensors = checkpoint.load_model_tensors(path, _template(root))
    raw = max(tensors.values(), key=lambda t: t.numel()).numpy().tobytes()
    data = bytearray((path / DATA_FILE).read_bytes())
    start = data.find(raw)
    assert start >= 0 and raw.count(b"\0") < len(raw) // 2
    length = min(4096, len(raw))
    data[start:start + length] = bytes(length)
    (path / DATA_FILE).write_bytes(bytes(data))
    return DATA_FILE


def _weights(root: Path, output: Path, name: str = "latest", verify: bool = True):
    return checkpoint.load_model_tensors(TrainOutput(output).checkpoint(name), _template(root), verify)


# ------------------------------------------------------------------------------------------ checkpoints


def test_every_file_of_a_checkpoint_is_checksummed(whole, root):
    for path in (root / "whole" / "checkpoints").iterdir():
        if path.is_dir():
            manifest = json.loads((path / checkpoint.MANIFEST).read_text())
            files = {p.name for p in path.iterdir() if p.name != checkpoint.MANIFEST}
            assert set(manifest["files"]) == files and ".metadata" in files and "rank_0.json" in files
            for name, entry in manifest["files"].items():
                assert entry == {"crc32": file_crc32(path / name), "bytes": (path / name).stat().st_size}
            assert checkpoint.verify_files(path)


def test_damaged_newest_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(root, whole, crashed, capsys):
    output = _copy(crashed, root / "resumed")
    damage(root, output / "checkpoints" / "step_000000008")
    capsys.readouterr()
    assert _train(root, "resumed") == 0
    err = capsys.readouterr().err
    assert "step_000000008" in err and DATA_FILE in err and "damaged" in err
    assert "resuming from the previous checkpoint, step_000000004" in err
    assert "resumed from" in err and "step_000000004" in err.split("resumed from")[1].splitlines()[0]
    resumed = json.loads((output / "train.json").read_text())
    assert resumed["steps"] == whole["steps"] == 12
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]] == [4, 8, 12]
    for a, b in zip(resumed["history"], whole["history"]):
        assert a["valid"] == pytest.approx(b["valid"], abs=1e-6)
    assert resumed["test"] == pytest.approx(whole["test"], abs=1e-6)
    expected, actual = _weights(root, root / "whole"), _weights(root, output)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_without_verification_the_damage_goes_unseen(root, whole, crashed, capsys):
    """The control: the same damage, train.verify_checkpoints=false: resumes from it silently and
    ends with other weights."""
    output = _copy(crashed, root / "unverified")
    damage(root, output / "checkpoints" / "step_000000008")
    capsys.readouterr()
    assert _train(root, "unverified", "train.verify_checkpoints=false") == 0
    err = capsys.readouterr().err
    assert "damaged" not in err and "step_000000008" in err.split("resumed from")[1].splitlines()[0]
    expected, actual = _weights(root, root / "whole"), _weights(root, output)
    assert any(not torch.allclose(actual[key], expected[key], atol=1e-6) for key in expected)


def test_resume_fails_when_no_step_checkpoint_is_intact(root, crashed, capsys):
    output = _copy(crashed, root / "all_damaged")
    for name in ("step_000000004", "step_000000008"):
        damage(root, output / "checkpoints" / name)
    capsys.readouterr()
    assert _train(root, "all_damaged") == 2
    err = capsys.readouterr().err
    assert "no intact step checkpoint to resume from (step_000000008, step_000000004 damaged)" in err
    assert not (output / "train.json").exists()


def test_load_model_and_export_name_the_damaged_file(root, whole, tmp_path):
    output = _copy(root / "whole", tmp_path / "whole")
    best = output / "checkpoints" / "best"
    damage(root, best)
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {best}: {DATA_FILE} is damaged"):
        checkpoint.load_model(TrainOutput(output))
    with pytest.raises(CheckpointIntegrityError, match=f"{best}: {DATA_FILE} is damaged"):
        export_artifact(output, tmp_path / "model.pt", parity_rows=64)
    assert not (tmp_path / "model.pt").exists()
    code = main(["export", "-c", str(_recipe(root, "whole")), f"export.source={output}", "export.parity_rows=64",
                 f"export.output={tmp_path / 'cli.pt'}"])
    assert code == 2 and not (tmp_path / "cli.pt").exists()
    # the control: unverified, the damaged weights load, and export's parity check passes against them
    damaged, intact = _weights(root, output, "best", verify=False), _weights(root, root / "whole", "best")
    assert any(not torch.equal(damaged[key], intact[key]) for key in intact)
    assert export_artifact(output, tmp_path / "model.pt", parity_rows=64, verify=False)["parity"]["max_abs_diff"] < 1e-5


def test_missing_files_and_a_damaged_manifest(root, whole, tmp_path):
    best = _copy(root / "whole" / "checkpoints" / "best", tmp_path / "best")
    (best / "rank_0.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {best}: rank_0.json is missing"):
        checkpoint.load_model_tensors(best, _template(root))
    (best / checkpoint.MANIFEST).write_text('{"files": ')
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {best}: checksums.json is damaged"):
        checkpoint.load_model_tensors(best, _template(root))


def test_a_checkpoint_without_checksums_loads_with_a_warning(root, whole, tmp_path):
    best = _copy(root / "whole" / "checkpoints" / "best", tmp_path / "best")
    (best / checkpoint.MANIFEST).unlink()
    with pytest.warns(CheckpointWarning, match="no checksums.json.*without verification"):
        tensors = checkpoint.load_model_tensors(best, _template(root))
    expected = _weights(root, root / "whole", "best")
    assert all(torch.equal(tensors[key], expected[key]) for key in expected)


@pytest.mark.multiprocess
def test_two_ranks_agree_on_a_file_only_one_of_them_checks(root):
    """Rank 1 checks __0_0.distcp (files are shared among the ranks); both fall back together."""
    config = write_recipe(root / "two.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 128, "shuffle": True},
        "train": {"model": MODEL, "output": str(root / "two"), "progress": False, "sharding": {"type": "row_wise"},
                  **{**SETTINGS, "max_steps": 6, "checkpoint_every_steps": 2, "eval_every_steps": 2}},
    })
    assert run_ranks(config, 2, fault="train_step=1:5")[1] == -9
    step_4 = root / "two" / "checkpoints" / "step_000000004"
    assert TrainOutput(root / "two").latest() == step_4
    data = bytearray((step_4 / DATA_FILE).read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (step_4 / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError):
        checkpoint.verify_files(step_4)
    assert run_ranks(config, 2) == [0, 0]
    assert json.loads((root / "two" / "train.json").read_text())["steps"] == 6
    assert checkpoint.verify_files(step_4)  # written again: the run went on from step 2, not from the damaged step 4


# ----------------------------------------------------------------------------- no code from a run directory


def _plant(path: Path, metadata_bytes: bytes, extra: Optional[Dict[str, bytes]] = None) -> None:
    """Replaces a checkpoint's .metadata (and adds ``extra`` files), updating checksums.json as an
    attacker would: verification passes, the restricted unpicklers are what refuses."""
    (path / ".metadata").write_bytes(metadata_bytes)
    extra = extra or {}
    for name, data in extra.items():
        (path / name).write_bytes(data)
    manifest_path = path / checkpoint.MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        for name in [".metadata", *extra]:
            manifest["files"][name] = {"crc32": file_crc32(path / name), "bytes": (path / name).stat().st_size}
        manifest_path.write_text(json.dumps(manifest))


def test_planted_metadata_is_refused_everywhere_and_never_runs(root, whole, crashed, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # the payload is live for plain pickle, which DCP's reader uses
    evil = pickle.dumps(_Payload(marker))
    refused = rf"\.metadata: refused to unpickle the global {re.escape(PAYLOAD_GLOBAL)}:"

    output = _copy(root / "whole", tmp_path / "export_source")
    _plant(output / "checkpoints" / "best", evil)
    with pytest.raises(CheckpointError, match=refused):
        checkpoint.load_model_tensors(output / "checkpoints" / "best", _template(root))
    with pytest.raises(CheckpointError, match=refused):
        checkpoint.load_model_tensors(output / "checkpoints" / "best", _template(root), verify=False)
    with pytest.raises(CheckpointError, match=refused):
        export_artifact(output, tmp_path / "model.pt", parity_rows=64)

    resumed = _copy(crashed, root / "planted_resume")
    for name in ("step_000000004", "step_000000008"):
        _plant(resumed / "checkpoints" / name, evil)
    capsys.readouterr()
    assert _train(root, "planted_resume") == 2
    assert f"refused to unpickle the global {PAYLOAD_GLOBAL}" in capsys.readouterr().err

    assert _train(root, "planted_init", f"train.init_from={output / 'checkpoints' / 'best'}") == 2
    err = capsys.readouterr().err
    assert f"refused to unpickle the global {PAYLOAD_GLOBAL}" in err and str(output / "checkpoints" / "best") in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_non_tensor_value_is_unpickled_weights_only(root, whole, tmp_path):
    """The second way in: metadata of allowed types only, saying a tensor is a pickled object; DCP's
    default planner would torch.load(weights_only=False) it from a data file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    marker = tmp_path / "PWNED"
    best = _copy(root / "whole" / "checkpoints" / "best", tmp_path / "best")
    metadata = checkpoint.read_metadata(best)
    key = "model.model.head.output.bias"
    blob = tmp_path / "blob"
    torch.save(_Payload(marker), blob)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, blob.stat().st_size)
    _plant(best, pickle.dumps(metadata), {"__9_0.distcp": blob.read_bytes()})
    torch.load(blob, weights_only=False)
    assert marker.exists()  # the control: the planted value is live for DCP's default planner
    marker.unlink()
    with pytest.raises(CheckpointError, match=f"{best}: refused to unpickle the stored value of {key}"):
        checkpoint.load_model_tensors(best, _template(root))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ artifacts


@pytest.fixture(scope="module")
def artifact(root, whole):
    path = root / "artifact" / "model.pt"
    record = export_artifact(root / "whole", path, parity_rows=64)
    assert record["checksum"] == {"crc32": file_crc32(path), "bytes": path.stat().st_size}
    return path


def _damaged_artifact(artifact: Path, target: Path) -> Path:
    """A copy of the artifact (with its record) whose largest tensor has 4 KB zeroed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(artifact, target)
    shutil.copy(export_record(artifact), export_record(target))
    with zipfile.ZipFile(target) as archive:
        entry = max((i for i in archive.infolist() if "/constants/" in i.filename or "/data/" in i.filename),
                    key=lambda i: i.file_size)
    data = bytearray(target.read_bytes())
    header = entry.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(data[header + 28:header + 30], "little")
    length = min(4096, entry.file_size)
    data[start:start + length] = bytes(length)
    target.write_bytes(bytes(data))
    return target


def test_a_damaged_artifact_is_refused_by_load_score_and_serve(root, artifact, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArtifactWarning)
        load_artifact(artifact)  # verified, no warning
    damaged = _damaged_artifact(artifact, tmp_path / "damaged.pt")
    with pytest.raises(ArtifactError, match=f"{damaged}: damaged or modified since export"):
        load_artifact(damaged)
    capsys.readouterr()
    assert main(["score", str(damaged), str(root / "data"), str(tmp_path / "scores"), "--no-progress"]) == 2
    assert f"{damaged}: damaged or modified since export" in capsys.readouterr().err
    assert main(["serve", str(damaged), "--port", "0"]) == 2
    with pytest.raises(ArtifactError, match="damaged"):
        make_server(damaged, port=0, quiet=True)
    # --no-verify: loads it (and its zeroed weights go unseen)
    module, _ = load_artifact(damaged, verify=False)
    assert main(["score", str(damaged), str(root / "data"), str(tmp_path / "scores"), "--no-progress", "--no-verify"]) == 0
    server = make_server(damaged, port=0, quiet=True, verify=False)
    server.server_close()
    assert _parser().parse_args(["serve", str(damaged), "--no-verify"]).verify is False


def test_an_artifact_without_a_record_loads_with_a_warning(artifact, tmp_path):
    alone = tmp_path / "alone.pt"
    shutil.copy(artifact, alone)
    with pytest.warns(ArtifactWarning, match="no alone.pt.export.json beside it"):
        load_artifact(alone)
    shutil.copy(export_record(artifact), export_record(alone))
    record = json.loads(export_record(alone).read_text())
    del record["checksum"]
    export_record(alone).write_text(json.dumps(record))
    with pytest.warns(ArtifactWarning, match="records no checksum"):
        load_artifact(alone)


def test_an_artifact_refuses_pickled_globals(artifact, tmp_path):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_Payload(marker), protocol=2)
    for inside in ("data.pkl", "constants.pkl"):
        planted = tmp_path / f"planted_{inside}.pt"
        with zipfile.ZipFile(artifact) as source, zipfile.ZipFile(planted, "w") as target:
            for entry in source.infolist():
                target.writestr(entry, evil if entry.filename.endswith("/" + inside) else source.read(entry))
        with pytest.raises(ArtifactError, match=f"{planted}: not a loadable TorchScript artifact.*{re.escape(PAYLOAD_GLOBAL)}"):
            load_artifact(planted, verify=False)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _Payload(marker)}, pickled)  # a torch.save file, not TorchScript
    pickled.with_name("raw.pt").write_bytes(evil)  # a bare pickle
    for path in (pickled, pickled.with_name("raw.pt")):
        with pytest.raises(ArtifactError, match="not a loadable TorchScript artifact"):
            load_artifact(path, verify=False)
    assert not marker.exists()
