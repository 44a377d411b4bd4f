"""The ``export`` stage: a trained model -> a verified TorchScript serving artifact that loads with torch alone.

:func:`export_artifact` reads a ``train`` output (``train.json``: model config and dataset), rebuilds
the plain model and fills it from a checkpoint of any sharding (``checkpoint.load_model_tensors``,
one process, no process group), builds the :class:`~recsys_kd.export.serving.ServingModel`, scripts
and freezes it, and saves it with two extra files:

- ``schema.json``: the dataset's schema (features, ``num_embeddings``, id rules);
- ``model.json``: model name and config, parameters, FLOPs, test metrics, source checkpoint, library
  versions, the storage dtype and the input contract (``input`` below).

The artifact is written under a temporary name, loaded back with ``torch.jit.load`` and checked
against the training model on the first ``parity_rows`` held-out rows (the test split); only then is
it renamed to its final name. For float32 storage the largest probability difference must be below
``parity_tolerance`` (1e-5) or :class:`ParityError` is raised and nothing is left under the final
name; for fp16 / int8 storage the record reports that difference and the AUC change instead. The
record (parity, sizes, paths, timings) is written beside the artifact as ``<name>.export.json``.

:func:`load_artifact` needs torch only (this module imports torchrec lazily, inside
:func:`export_artifact`).

Example::

    record = export_artifact(Path("runs/criteo/dagfm"), Path("runs/criteo/dagfm.pt"))
    module, metadata = load_artifact("runs/criteo/dagfm.pt")   # torch only
    probabilities = module(dense, ids, offsets)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from recsys_kd.export.serving import INPUT_ORDER, STORAGE_DTYPES, ServingModel, example_major_inputs, script_serving
from recsys_kd.io import atomic_file, atomic_write_json

ARTIFACT_FORMAT = 1
SCHEMA_FILE = "schema.json"
MODEL_FILE = "model.json"
EXTRA_FILES = (SCHEMA_FILE, MODEL_FILE)
RECORD_SUFFIX = ".export.json"
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """The saved artifact does not reproduce the training model's probabilities."""


class ArtifactError(ValueError):
    """A file is not a serving artifact (missing metadata) or its inputs are unusable."""


def record_path(out_path: Union[str, Path]) -> Path:
    """Where :func:`export_artifact` writes its record: ``<artifact>.export.json`` beside the artifact."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + RECORD_SUFFIX)


def load_artifact(path: Union[str, Path]) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """
    Loads a serving artifact with torch alone.

    Args:
        path: the artifact file.

    Returns:
        Tuple[torch.jit.ScriptModule, Dict[str, Any]]: the module (``forward(dense, ids, offsets)`` ->
        probabilities, ``forward_logits``) and its metadata ``{"schema": ..., "model": ...}`` (the two
        extra files, parsed).

    Raises:
        ArtifactError: the file carries no serving metadata.
    """
    extra = {name: "" for name in EXTRA_FILES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # every torch.jit call warns in torch 2.13
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    missing = [name for name in EXTRA_FILES if not extra[name]]
    if missing:
        raise ArtifactError(f"{path}: not a recsys_kd serving artifact (no {', '.join(missing)} inside)")
    metadata = {name.removesuffix(".json"): json.loads(extra[name]) for name in EXTRA_FILES}
    return module, metadata


def export_artifact(
    train_output: Union[str, Path],
    out_path: Union[str, Path],
    checkpoint: str = "best",
    parity_rows: int = 2048,
    dtype: str = "float32",
    dataset: Optional[Union[str, Path]] = None,
    parity_tolerance: float = PARITY_TOLERANCE,
) -> Dict[str, Any]:
    """
    Exports a trained model as a TorchScript serving artifact and verifies it.

    Args:
        train_output: a ``train`` output directory: ``train.json`` (``config.model``, ``dataset``, ``test``)
            and ``checkpoints/``.
        out_path: the artifact file to write.
        checkpoint: ``"best"``, ``"latest"``, a checkpoint directory name under ``checkpoints/``
            (``step_000001200``), or a path to a checkpoint directory.
        parity_rows: how many held-out rows (the first of the test split) the parity check scores.
        dtype: storage of the fused embedding table: ``"float32"``, ``"fp16"`` or ``"int8"``.
        dataset: the prepared dataset; defaults to the one named in ``train.json``.
        parity_tolerance: the largest probability difference allowed for float32 storage.

    Returns:
        Dict[str, Any]: the record, also written to ``<out_path>.export.json``: paths, size, parity
        (rows, max abs difference, AUCs), serving latency at batch 1, timings.

    Raises:
        ParityError: float32 artifact differs from the training model by ``parity_tolerance`` or more
            (no artifact is left under ``out_path``).
        ArtifactError: missing ``train.json``, checkpoint or dataset.
    """
    # torchrec-dependent imports are local: load_artifact (and `import recsys_kd.export`) need torch only
    import recsys_kd
    from recsys_kd.config import from_dict, to_dict
    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import MISSING_ID, OOV_ID, Schema
    from recsys_kd.models.zoo import ModelConfig, build_model
    from recsys_kd.train import checkpoint as checkpoints
    from recsys_kd.train.metrics import auc

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if parity_rows < 1:
        raise ValueError(f"parity_rows must be >= 1, got {parity_rows}")
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    train_output, out_path = Path(train_output), Path(out_path)

    record_file = train_output / "train.json"
    if not record_file.exists():
        raise ArtifactError(f"{record_file}: not found; is {train_output} a train output?")
    train_record = json.loads(record_file.read_text())
    source = str(record_file)
    model_config = from_dict(ModelConfig, train_record["config"]["model"], source=source, prefix="config.model")
    dataset = Path(dataset if dataset is not None else train_record["dataset"])
    schema = Schema.load(dataset)
    checkpoint_path = _resolve_checkpoint(train_output, checkpoint, checkpoints)
    checkpoint_state = _rank0_state(checkpoint_path)

    # the plain training model, filled from the (possibly sharded) checkpoint
    t = time.perf_counter()
    model = build_model(schema, model_config)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    checkpoints.load_model_tensors(checkpoint_path, state)
    model.load_state_dict({key[len("model."):]: value for key, value in state.items()})
    model.eval()
    timings["load_checkpoint_s"] = time.perf_counter() - t

    t = time.perf_counter()
    serving = ServingModel.from_model(model, num_dense_inputs=len(schema.dense), storage=dtype).eval()
    scripted = script_serving(serving, roundtrip=False)  # saved, then loaded back for the parity check
    timings["script_freeze_s"] = time.perf_counter() - t

    libraries = _library_versions()
    metadata = {
        "format": ARTIFACT_FORMAT,
        "kind": "recsys_kd.serving",
        "model": model_config.name,
        "config": to_dict(model_config),
        "storage_dtype": dtype,
        "parameters": model.num_parameters(),
        "serving_parameters": {
            "fused_table_rows": int(serving.num_embeddings.sum()),
            "bytes": sum(b.numel() * b.element_size() for b in serving.buffers())
            + sum(p.numel() * p.element_size() for p in serving.parameters()),
        },
        "flops_per_example": model.flops_per_example(),
        "compression": getattr(model, "compression_log", []),
        "metrics": {"test": train_record.get("test"), "best_valid": train_record.get("best_valid")},
        "source": {
            "train_output": str(train_output),
            "checkpoint": str(checkpoint_path),
            "checkpoint_step": checkpoint_state.get("step"),
            "dataset": str(dataset),
            "train_steps": train_record.get("steps"),
        },
        "libraries": libraries,
        "recsys_kd_version": recsys_kd.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": _input_contract(schema, serving, MISSING_ID, OOV_ID),
    }
    extra_files = {SCHEMA_FILE: schema.to_json(), MODEL_FILE: json.dumps(metadata, indent=2, default=str) + "\n"}

    split = _parity_split(schema)
    reader = ParquetReader(dataset, split, ReaderConfig(batch_size=parity_rows, shuffle=False), rank=0, world_size=1)
    batch = next(iter(reader))
    ids, offsets = example_major_inputs(batch.sparse.values(), batch.sparse.lengths(), batch.batch_size, len(schema.sparse))

    with atomic_file(out_path) as temp:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, str(temp), _extra_files=extra_files)
        timings["save_s"] = time.perf_counter() - t

        t = time.perf_counter()
        loaded, loaded_metadata = load_artifact(temp)
        if loaded_metadata["model"]["input"] != json.loads(extra_files[MODEL_FILE])["input"]:
            raise ParityError(f"{out_path}: the metadata read back differs from the metadata written")
        with torch.no_grad():
            reference = torch.sigmoid(model(batch.dense, batch.sparse))
            served = loaded(batch.dense, ids, offsets)
        max_diff = float((reference - served).abs().max()) if reference.numel() else 0.0
        labels = batch.labels.numpy()
        auc_model, auc_artifact = auc(labels, reference.numpy()), auc(labels, served.numpy())
        parity = {
            "split": split,
            "rows": int(batch.batch_size),
            "max_abs_diff": max_diff,
            "tolerance": parity_tolerance if dtype == "float32" else None,
            "auc_training_model": auc_model,
            "auc_artifact": auc_artifact,
            "auc_delta": auc_artifact - auc_model,
        }
        timings["parity_s"] = time.perf_counter() - t
        if dtype == "float32" and not max_diff < parity_tolerance:
            raise ParityError(
                f"{out_path}: the scripted artifact's probabilities differ from the training model's by up to "
                f"{max_diff:.3g} on {parity['rows']} {split} rows (tolerance {parity_tolerance:g}); "
                "the artifact was not written"
            )
        latency = _latency(loaded, batch.dense[:1], *_first_example(ids, offsets, len(schema.sparse)))
        size = os.path.getsize(temp)

    record = {
        "stage": "export",
        "artifact": str(out_path),
        "record": str(record_path(out_path)),
        "train_output": str(train_output),
        "checkpoint": str(checkpoint_path),
        "dataset": str(dataset),
        "model": model_config.name,
        "dtype": dtype,
        "size_bytes": size,
        "parity": parity,
        "latency_batch1_ms": latency,
        "torch_threads": torch.get_num_threads(),
        "libraries": libraries,
        "timings": {key: round(value, 4) for key, value in {**timings, "total_s": time.perf_counter() - started}.items()},
    }
    atomic_write_json(record_path(out_path), record)
    return record


# ---------------------------------------------------------------------------------------------- parts


def _resolve_checkpoint(train_output: Path, name: str, checkpoints) -> Path:
    directory = train_output / "checkpoints"
    if name == checkpoints.LATEST:
        path = checkpoints.latest(directory)
        if path is None:
            raise ArtifactError(f"{directory}: no complete step checkpoint (no 'latest' pointer)")
        return path
    path = Path(name) if Path(name).is_absolute() or os.sep in name else directory / name
    if not (path / ".metadata").exists():
        raise ArtifactError(f"{path}: not a checkpoint (no .metadata); known: {_known_checkpoints(directory)}")
    return path


def _known_checkpoints(directory: Path) -> str:
    names = sorted(p.name for p in directory.glob("*") if (p / ".metadata").exists()) if directory.is_dir() else []
    return ", ".join(names) or "none"


def _rank0_state(path: Path) -> Dict[str, Any]:
    rank_file = path / "rank_0.json"
    return json.loads(rank_file.read_text()) if rank_file.exists() else {}


def _parity_split(schema) -> str:
    for split in ("test", "valid", "train"):
        if split in schema.splits and schema.splits[split].rows > 0:
            return split
    raise ArtifactError(f"dataset {schema.name!r} has no rows to check parity on")


def _input_contract(schema, serving: ServingModel, missing_id: int, oov_id: int) -> Dict[str, Any]:
    sparse = [
        {"name": f.name, "num_embeddings": f.num_embeddings, "multi_hot": f.multi_hot, "id_rule": f.id_rule.kind}
        for f in schema.sparse
    ]
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


def _first_example(ids: torch.Tensor, offsets: torch.Tensor, num_features: int) -> Tuple[torch.Tensor, torch.Tensor]:
    bounds = offsets[: num_features + 1]
    return ids[int(bounds[0]) : int(bounds[-1])].clone(), bounds - bounds[0]


def _latency(module, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, runs: int = 30) -> Optional[float]:
    """Median milliseconds of one batch-1 call (after warm-up), at the current thread count."""
    if dense.shape[0] == 0:
        return None
    times = []
    with torch.no_grad():
        for run in range(runs + 5):
            t = time.perf_counter()
            module(dense, ids, offsets)
            if run >= 5:
                times.append(time.perf_counter() - t)
    times.sort()
    return round(1000 * times[len(times) // 2], 4)
