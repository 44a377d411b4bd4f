"""The ``export`` stage: a trained model -> a verified serving artifact that loads with torch alone:
TorchScript (``export.format: torchscript``, the default) or compiled (``aoti``: :mod:`recsys_kd.export.compiled`).

:func:`export_artifact` reads a ``train``, ``distill`` or ``compress``-step output through
:class:`~recsys_kd.runs.TrainOutput`, rebuilds the plain model from a checkpoint of any sharding
(:func:`recsys_kd.train.checkpoint.load_model`: one process, no process group), builds the
:class:`~recsys_kd.export.serving.ServingModel`, scripts and freezes it, and saves it with two extra
files:

- ``schema.json``: the dataset's schema (features, ``num_embeddings``, id rules);
- ``model.json``: model name and config, parameters, FLOPs, test metrics, source checkpoint, library
  versions, the storage dtype and the input contract (``input`` below).

The artifact is written under a temporary name, loaded back with ``torch.jit.load`` and checked
against the training model on the first ``parity_rows`` held-out rows (the test split); only then is
it renamed to its final name. For float32 storage the largest probability difference must be below
``parity_tolerance`` (1e-5) or :class:`ParityError` is raised and nothing is left under the final
name; for fp16 / int8 storage the record reports that difference and the AUC change instead. The
record (parity, sizes, paths, timings, and the artifact's CRC-32 and size under ``checksum``) is
written beside the artifact as ``<name>.export.json`` (:func:`recsys_kd.runs.export_record`).

:func:`load_artifact` needs torch only (this module imports torchrec lazily, in the steps of
:func:`export_artifact`). It checks the file against the record's checksum when the record is beside
it (``verify=False`` skips that), and ``torch.jit.load`` resolves no Python global: a pickled payload
inside the archive is refused, and the code inside is TorchScript, run by the TorchScript interpreter.

Example::

    record = export_artifact(Path("runs/criteo/dagfm"), Path("runs/criteo/dagfm.pt"))
    module, metadata = load_artifact("runs/criteo/dagfm.pt")   # torch only
    probabilities = module(dense, ids, offsets)            # a weighted dataset's model: (..., weights)

Longer than 500 lines because export is one flow (load, script, save, load back, check parity, time,
record) whose steps and input contract read best beside it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch

import recsys_kd
from recsys_kd.config import to_dict
from recsys_kd.data.schema import MISSING_ID, OOV_ID, Schema
from recsys_kd.export.compiled import FORMATS, compile_serving, cxx_compiler, is_compiled_package, load_compiled
from recsys_kd.export.serving import (INPUT_ORDER, ServingModel, example_major_inputs, example_major_weights,
                                      script_serving)
from recsys_kd.export.tables import STORAGE_DTYPES, serving_bytes
from recsys_kd.io import atomic_file, atomic_write_json, file_crc32
from recsys_kd.runs import OutputError, TrainOutput, export_record
from recsys_kd.train.metrics import auc

if TYPE_CHECKING:  # pragma: no cover
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_kd.models.zoo import CTRModel, ModelConfig

ARTIFACT_FORMAT = 1
SCHEMA_FILE = "schema.json"
MODEL_FILE = "model.json"
EXTRA_FILES = (SCHEMA_FILE, MODEL_FILE)
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """The saved artifact does not reproduce the training model's probabilities."""


class ArtifactError(ValueError):
    """A file is not a serving artifact (missing metadata, damaged) or its inputs are unusable."""


class ArtifactWarning(UserWarning):
    """An artifact is loaded without verification: no export record beside it, or one without a checksum."""


def load_artifact(path: Union[str, Path], verify: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """
    Loads a serving artifact with torch alone: a TorchScript archive or a compiled ``.pt2`` package
    (told apart by their contents, not their names).

    Args:
        path: the artifact file.
        verify: first check the file against the checksum in its export record
            (:func:`verify_artifact`).

    Returns:
        Tuple[Any, Dict[str, Any]]: the module (a ``torch.jit.ScriptModule`` or a
        :class:`~recsys_kd.export.compiled.CompiledServing`: ``module(dense, ids, offsets)`` ->
        probabilities, ``forward_logits``) and its metadata ``{"schema": ..., "model": ...}`` (the two
        extra files, parsed).

    Raises:
        ArtifactError: the file differs from its record's checksum, is not a TorchScript archive
            (a pickled Python global inside is refused), or carries no serving metadata.
    """
    if verify:
        verify_artifact(path)
    if is_compiled_package(path):
        try:
            module, extra = load_compiled(path, list(EXTRA_FILES))
        except RuntimeError as error:
            raise ArtifactError(f"{path}: not a loadable compiled (.pt2) artifact ({' '.join(str(error).split())[:300]})") from None
        return module, _metadata(path, extra)
    extra = {name: "" for name in EXTRA_FILES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # every torch.jit call warns in torch 2.13
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:300]
            raise ArtifactError(f"{path}: not a loadable TorchScript artifact ({reason})") from None
    return module, _metadata(path, extra)


def _metadata(path: Union[str, Path], extra: Dict[str, str]) -> Dict[str, Any]:
    """``{"schema": ..., "model": ...}`` from the extra files' texts; ArtifactError when one is missing."""
    missing = [name for name in EXTRA_FILES if not extra.get(name)]
    if missing:
        raise ArtifactError(f"{path}: not a recsys_kd serving artifact (no {', '.join(missing)} inside)")
    return {name.removesuffix(".json"): json.loads(extra[name]) for name in EXTRA_FILES}


def verify_artifact(path: Union[str, Path]) -> bool:
    """
    Checks an artifact against the CRC-32 and size its export record (``<path>.export.json``) holds.

    Returns True when verified, False (with an :class:`ArtifactWarning`) when there is no record beside
    it or the record has no checksum (an export from before checksums were recorded).

    Raises:
        ArtifactError: the file differs from the record (names the file), or the record is unreadable.
    """
    path, record_path = Path(path), export_record(path)
    if not record_path.exists():
        warnings.warn(f"{path}: no {record_path.name} beside it: loaded without verification", ArtifactWarning, stacklevel=3)
        return False
    try:
        expected = json.loads(record_path.read_text()).get("checksum")
    except (ValueError, AttributeError) as error:
        raise ArtifactError(f"{record_path}: not a readable export record ({error}); cannot verify {path}") from None
    if expected is None:
        warnings.warn(f"{path}: {record_path.name} records no checksum (exported before checksums were recorded): "
                      "loaded without verification", ArtifactWarning, stacklevel=3)
        return False
    if not isinstance(expected, dict):
        raise ArtifactError(f"{record_path}: its checksum entry is damaged; cannot verify {path}")
    size = path.stat().st_size
    actual = file_crc32(path) if size == expected.get("bytes") else f"{size} bytes"
    if actual != expected.get("crc32"):
        raise ArtifactError(f"{path}: damaged or modified since export ({actual}, {record_path.name} records crc32 "
                            f"{expected.get('crc32')} of {expected.get('bytes')} bytes); --no-verify loads it anyway")
    return True


def export_artifact(
    train_output: Union[str, Path],
    out_path: Union[str, Path],
    checkpoint: str = "best",
    parity_rows: int = 2048,
    dtype: str = "float32",
    dataset: Optional[Union[str, Path]] = None,
    parity_tolerance: float = PARITY_TOLERANCE,
    verify: bool = True,
    format: str = "torchscript",
) -> Dict[str, Any]:
    """
    Exports a trained model as a serving artifact (TorchScript or compiled) and verifies it.

    Args:
        train_output: a ``train``, ``distill`` or ``compress``-step output directory (its record:
            ``config.model``, ``dataset``, ``test``; and ``checkpoints/``).
        out_path: the artifact file to write.
        checkpoint: ``"best"``, ``"latest"``, a checkpoint directory name under ``checkpoints/``
            (``step_000001200``), or a path to a checkpoint directory.
        parity_rows: how many held-out rows (the first of the test split) the parity check scores.
        dtype: storage of the fused embedding table: ``"float32"``, ``"fp16"`` or ``"int8"``.
        dataset: the prepared dataset; defaults to the one named in the output's record.
        parity_tolerance: the largest probability difference allowed for float32 storage.
        verify: check the checkpoint's files against its ``checksums.json`` before loading it.
        format: ``"torchscript"`` (scripted and frozen) or ``"aoti"`` (``torch.export`` + AOTInductor,
            a ``.pt2`` package; needs a C++ compiler).

    Returns:
        Dict[str, Any]: the record, also written to ``<out_path>.export.json``: paths, size, parity
        (rows, max abs difference, AUCs), serving latency at batch 1, timings.

    Raises:
        ParityError: float32 artifact differs from the training model by ``parity_tolerance`` or more
            (no artifact is left under ``out_path``).
        ArtifactError: missing record or checkpoint, or a dataset with no rows to check.
        CheckpointIntegrityError: a checkpoint file is missing or damaged (``verify``).
        CompilerMissing: ``format="aoti"`` without a C++ compiler (raised before any work).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "aoti":
        cxx_compiler()  # fail in one line before any work
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if parity_rows < 1:
        raise ValueError(f"parity_rows must be >= 1, got {parity_rows}")
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    out_path = Path(out_path)
    source = _open_source(train_output, checkpoint, dataset)
    schema = Schema.load(source.dataset)
    if format == "aoti" and schema.weighted:
        raise ArtifactError(f"{source.dataset}: weighted features (libSVM/libFM values) are not supported by "
                            "format aoti; export with format torchscript")

    with _timed(timings, "load_checkpoint_s"):
        model = _load_training_model(source, verify)
    with _timed(timings, "script_freeze_s"):
        serving = ServingModel.from_model(model, num_dense_inputs=len(schema.dense), storage=dtype).eval()
        scripted = script_serving(serving, roundtrip=False) if format == "torchscript" else None
    libraries = _library_versions()
    metadata = {**_serving_metadata(source, schema, model, serving, dtype, libraries), "artifact_format": format}
    extra_files = {SCHEMA_FILE: schema.to_json(), MODEL_FILE: json.dumps(metadata, indent=2, default=str) + "\n"}
    rows = _parity_batch(source.dataset, schema, parity_rows)

    with atomic_file(out_path) as temp:
        with _timed(timings, "save_s"):
            if scripted is None:
                compile_serving(serving, temp, extra_files, multi_hot=any(f.multi_hot for f in schema.sparse))
            else:
                _save(scripted, temp, extra_files)
        with _timed(timings, "parity_s"):
            loaded = _load_back(temp, extra_files, out_path)
            parity = _check_parity(model, loaded, rows, dtype, parity_tolerance, out_path)
        latency = _latency(loaded, rows.dense[:1], *_first_example(rows.ids, rows.offsets, len(schema.sparse), rows.weights))
        checksum = {"crc32": file_crc32(temp), "bytes": os.path.getsize(temp)}
        if export_record(out_path).exists():
            export_record(out_path).unlink()  # never a stale record beside the new artifact

    timings["total_s"] = time.perf_counter() - started
    record = {**_export_record(source, out_path, dtype, checksum, parity, latency, libraries, timings), "format": format}
    atomic_write_json(export_record(out_path), record)
    return record


# ---------------------------------------------------------------------------------------------- steps


class _Source(NamedTuple):
    """What is exported: the stage output, the checkpoint path, the dataset and the model config."""

    output: TrainOutput
    checkpoint: Path
    dataset: Path
    model_config: ModelConfig


class _ParityRows(NamedTuple):
    """The held-out rows of the parity check, as the training model and the artifact take them."""

    split: str
    size: int
    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    ids: torch.Tensor
    offsets: torch.Tensor
    weights: Optional[torch.Tensor]  # [N] example-major, for a weighted dataset


def _open_source(train_output: Union[str, Path], checkpoint: str, dataset: Optional[Union[str, Path]]) -> _Source:
    """Reads the output's record and resolves the checkpoint; a missing or unusable one is an ArtifactError."""
    from recsys_kd.train.checkpoint import recorded_model_config  # torch.distributed.checkpoint: only to export

    output = TrainOutput(train_output)
    try:
        model_config = recorded_model_config(output)
        dataset = Path(dataset) if dataset is not None else output.dataset
        return _Source(output, output.checkpoint(checkpoint), dataset, model_config)
    except OutputError as error:
        raise ArtifactError(str(error)) from None


def _load_training_model(source: _Source, verify: bool) -> CTRModel:
    """The plain training model, filled from the (possibly sharded) checkpoint, in eval mode."""
    from recsys_kd.train.checkpoint import load_model

    return load_model(source.output, str(source.checkpoint), source.dataset, verify)


def _serving_metadata(
    source: _Source,
    schema: Schema,
    model: CTRModel,
    serving: ServingModel,
    dtype: str,
    libraries: Dict[str, Optional[str]],
) -> Dict[str, Any]:
    """The artifact's ``model.json``: what the model is, where it came from, and its input contract."""
    record = source.output.record
    return {
        "format": ARTIFACT_FORMAT,
        "kind": "recsys_kd.serving",
        "model": source.model_config.name,
        "config": to_dict(source.model_config),
        "storage_dtype": dtype,
        "parameters": model.num_parameters(),
        "serving_parameters": serving_bytes(serving),
        "flops_per_example": model.flops_per_example(),
        "compression": getattr(model, "compression_log", []),
        "metrics": {"test": source.output.test_metrics, "best_valid": record.get("best_valid")},
        "source": {
            "train_output": str(source.output.path),
            "checkpoint": str(source.checkpoint),
            "checkpoint_step": _checkpoint_step(source.checkpoint),
            "dataset": str(source.dataset),
            "train_steps": record.get("steps"),
        },
        "libraries": libraries,
        "recsys_kd_version": recsys_kd.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": _input_contract(schema, serving, MISSING_ID, OOV_ID),
    }


def _parity_batch(dataset: Path, schema: Schema, parity_rows: int) -> _ParityRows:
    """The first ``parity_rows`` rows of the first non-empty split of test, valid, train."""
    from recsys_kd.data.reader import ParquetReader, ReaderConfig  # torchrec: only to export

    split = _parity_split(schema)
    reader = ParquetReader(dataset, split, ReaderConfig(batch_size=parity_rows, shuffle=False), rank=0, world_size=1)
    batch = next(iter(reader))
    sparse = batch.sparse
    ids, offsets = example_major_inputs(sparse.values(), sparse.lengths(), batch.batch_size, len(schema.sparse))
    weights = sparse.weights_or_none()
    if weights is not None:
        weights = example_major_weights(weights, sparse.lengths(), batch.batch_size, len(schema.sparse))
    return _ParityRows(split, int(batch.batch_size), batch.dense, sparse, batch.labels, ids, offsets, weights)


def _save(scripted: torch.jit.ScriptModule, path: Path, extra_files: Dict[str, str]) -> None:
    """Saves the module with its extra files (``schema.json``, ``model.json``). torch reports a failed
    write (a full or read-only disk) as a RuntimeError from its zip writer: it becomes an OSError
    naming the file, which the CLI prints as one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.jit.save(scripted, str(path), _extra_files=extra_files)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:200]
            raise OSError(f"{path}: cannot write the artifact ({detail})") from error


def _load_back(path: Path, extra_files: Dict[str, str], out_path: Path) -> Any:
    """The saved artifact as :func:`load_artifact` gives it, its input contract checked against the one written."""
    loaded, loaded_metadata = load_artifact(path, verify=False)  # just written; its record comes last
    if loaded_metadata["model"]["input"] != json.loads(extra_files[MODEL_FILE])["input"]:
        raise ParityError(f"{out_path}: the metadata read back differs from the metadata written")
    return loaded


def _check_parity(
    model: CTRModel, artifact: Any, rows: _ParityRows, dtype: str, tolerance: float, out_path: Path
) -> Dict[str, Any]:
    """The artifact's probabilities against the training model's on the parity rows; raises
    :class:`ParityError` when float32 storage differs by ``tolerance`` or more."""
    with torch.no_grad():
        reference = torch.sigmoid(model(rows.dense, rows.sparse))
        served = artifact(*_inputs(rows.dense, rows.ids, rows.offsets, rows.weights))
    max_diff = float((reference - served).abs().max()) if reference.numel() else 0.0
    labels = rows.labels.numpy()
    auc_model, auc_artifact = auc(labels, reference.numpy()), auc(labels, served.numpy())
    if dtype == "float32" and not max_diff < tolerance:
        raise ParityError(
            f"{out_path}: the scripted artifact's probabilities differ from the training model's by up to "
            f"{max_diff:.3g} on {rows.size} {rows.split} rows (tolerance {tolerance:g}); "
            "the artifact was not written"
        )
    return {
        "split": rows.split,
        "rows": rows.size,
        "max_abs_diff": max_diff,
        "tolerance": tolerance if dtype == "float32" else None,
        "auc_training_model": auc_model,
        "auc_artifact": auc_artifact,
        "auc_delta": auc_artifact - auc_model,
    }


def _export_record(
    source: _Source,
    out_path: Path,
    dtype: str,
    checksum: Dict[str, Any],
    parity: Dict[str, Any],
    latency: Optional[float],
    libraries: Dict[str, Optional[str]],
    timings: Dict[str, float],
) -> Dict[str, Any]:
    return {
        "stage": "export",
        "artifact": str(out_path),
        "record": str(export_record(out_path)),
        "train_output": str(source.output.path),
        "checkpoint": str(source.checkpoint),
        "dataset": str(source.dataset),
        "model": source.model_config.name,
        "dtype": dtype,
        "size_bytes": checksum["bytes"],
        "checksum": checksum,
        "parity": parity,
        "latency_batch1_ms": latency,
        "torch_threads": torch.get_num_threads(),
        "libraries": libraries,
        "timings": {key: round(value, 4) for key, value in timings.items()},
    }


# ---------------------------------------------------------------------------------------------- parts


@contextmanager
def _timed(timings: Dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def _checkpoint_step(path: Path) -> Optional[int]:
    """The training step a checkpoint was written at (its ``rank_0.json``), None when it records none."""
    rank_file = path / "rank_0.json"
    return json.loads(rank_file.read_text()).get("step") if rank_file.exists() else None


def _parity_split(schema: Schema) -> str:
    """The first split of test, valid, train that has rows."""
    for split in ("test", "valid", "train"):
        if split in schema.splits and schema.splits[split].rows > 0:
            return split
    raise ArtifactError(f"dataset {schema.name!r} has no rows to check parity on")


def unweighted_contract(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The artifact's input contract, for a consumer that passes no weights (``serve``: JSON instances
    carry ids only); ArtifactError for a model of weighted features, whose values would be lost."""
    contract = metadata["model"]["input"]
    if "weights" in contract:
        raise ArtifactError("this model's features are weighted (libSVM/libFM values): serve does not take "
                            "weights yet; score them with `recsys-kd score`")
    return contract


def _input_contract(schema: Schema, serving: ServingModel, missing_id: int, oov_id: int) -> Dict[str, Any]:
    """The ``input`` entry of ``model.json``: what ``forward`` takes and returns."""
    sparse = [
        {"name": f.name, "num_embeddings": f.num_embeddings, "multi_hot": f.multi_hot, "id_rule": f.id_rule.kind,
         **({"weighted": f.weighted} if schema.weighted else {})}
        for f in schema.sparse
    ]
    weighted = {
        "signature": "forward(dense, ids, offsets, weights) -> probabilities [B]; forward_logits(...) -> logits [B]",
        "weights": {"dtype": "float32", "shape": ["N"], "meaning": (
            "each id's value (1.0 for the ids of unweighted features): a bag pools sum(weight * embedding row)")},
    } if schema.weighted else {}
    return {
        "signature": "forward(dense, ids, offsets) -> probabilities [B]; forward_logits(...) -> logits [B]",
        "dense": {"dtype": "float32", "shape": ["B", len(schema.dense)], "columns": list(schema.dense),
                  "used": serving.num_dense > 0, "transform": schema.dense_transform},
        "ids": {"dtype": "int64", "shape": ["N"]},
        "offsets": {"dtype": "int64", "shape": ["B * F_sparse + 1"], "F_sparse": len(schema.sparse)},
        "bag_order": INPUT_ORDER,
        "bag_order_doc": (
            "bag k = b * F_sparse + f holds example b's ids of sparse feature f (sparse_features order): "
            "ids[offsets[k]:offsets[k+1]]; single-valued features have bags of length 1, multi-hot any "
            "length (empty bags pool to zeros); all single-valued: ids = id matrix [B, F_sparse] row by row, "
            "offsets = arange(B * F_sparse + 1)"
        ),
        "sparse_features": sparse,
        "reserved_ids": {str(missing_id): "missing", str(oov_id): "out of vocabulary"},
        "id_range": "each id in [0, num_embeddings) of its feature, else forward raises",
        "field_order": (list(schema.dense) if serving.num_dense > 0 else []) + [f.name for f in schema.sparse],
        "output": {"dtype": "float32", "shape": ["B"], "meaning": "click probability (sigmoid of the logit)"},
        **weighted,
    }


def _library_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for name in ("torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _first_example(
    ids: torch.Tensor, offsets: torch.Tensor, num_features: int, weights: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    bounds = offsets[: num_features + 1]
    first = slice(int(bounds[0]), int(bounds[-1]))
    return ids[first].clone(), bounds - bounds[0], None if weights is None else weights[first].clone()


def _inputs(dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor]) -> Tuple:
    """The artifact's arguments: ``weights`` only for a weighted model (others take three)."""
    return (dense, ids, offsets) if weights is None else (dense, ids, offsets, weights)


def _latency(module, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
             runs: int = 30) -> Optional[float]:
    """Median milliseconds of one batch-1 call (after warm-up), at the current thread count."""
    if dense.shape[0] == 0:
        return None
    times = []
    inputs = _inputs(dense, ids, offsets, weights)
    with torch.no_grad():
        for run in range(runs + 5):
            t = time.perf_counter()
            module(*inputs)
            if run >= 5:
                times.append(time.perf_counter() - t)
    times.sort()
    return round(1000 * times[len(times) // 2], 4)
